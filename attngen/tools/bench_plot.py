"""`attngen bench --plot F.png` and `attngen bench-merge FILES --plot F.png`: the benchmark's ratios
against each peer, per spec (a panel each) and shape (a group of bars each): the peer's time over
ours, so above 1 means faster than that peer. matplotlib, the `plot` extra."""

from __future__ import annotations

PEER_ORDER = ("flex", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "before")


def ratios(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """spec -> shape -> peer -> peer ms / attngen ms, for rows of `attngen bench --json` (peers that
    did not run at a shape are left out)."""
    out: dict = {}
    for row in rows:
        ms = row.get("ms", {})
        ours = ms.get("attngen")
        if not isinstance(ours, (int, float)) or ours <= 0:
            continue
        label = row["spec"] + (f" ({row['mode']})" if row.get("mode") else "")
        cells = out.setdefault(label, {}).setdefault(row["shape"], {})
        for peer, t in ms.items():
            if peer != "attngen" and isinstance(t, (int, float)) and t > 0:
                cells[peer] = t / ours
    return out


def title_of(env: dict | None) -> str:
    if not env:
        return ""
    return f"{env.get('device', '')}; torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}; peer time / ours"


def plot(rows: list[dict], path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot draws with matplotlib: pip install 'attngen[plot]' (or matplotlib)") from e
    table = ratios(rows)
    if not table:
        raise ValueError("--plot: no row has a time for attngen")
    peers = sorted({p for shapes in table.values() for cells in shapes.values() for p in cells},
                   key=lambda p: (PEER_ORDER.index(p) if p in PEER_ORDER else len(PEER_ORDER), p))
    cols = min(3, len(table))
    n_rows = -(-len(table) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    width = 0.8 / max(len(peers), 1)
    for ax, (spec, shapes) in zip(axes.flat, table.items()):
        names = list(shapes)
        for i, peer in enumerate(peers):
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [shapes[s].get(peer, float("nan")) for s in names], width, label=peer)  # no bar: not run
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), [s.replace(" ", "\n") for s in names], fontsize=7)
        ax.set_title(spec, fontsize=9)
        ax.set_ylabel("peer time / ours", fontsize=8)
    for ax in list(axes.flat)[len(table):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

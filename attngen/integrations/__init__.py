"""attngen's integrations with other libraries, each in its own module and imported on demand (the
library it serves is not a dependency of attngen):

    from attngen.integrations.transformers import register   # Hugging Face transformers (docs/integration.md)
"""

"""edgetune: fine-tune, compress and deploy small language models across fleets of edge
devices, federated.

Importing the package stays cheap: heavy dependencies (torch, transformers, peft) are
imported by the submodules that need them.
"""

__version__ = "0.1.0"

"""shadowgate's developer tooling, not shipped in the image: the local control plane, node and images
(`localenv`, `shadowgate dev ...`, `shadowgate node ...`) and the demo (`demo`, `shadowgate demo`)."""

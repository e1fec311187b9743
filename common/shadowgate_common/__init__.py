"""What the operator and the router share without importing each other: the Kubernetes credential loader
(`kubeaccess`). It imports neither shadowgate_operator nor shadowgate_router (.importlinter)."""

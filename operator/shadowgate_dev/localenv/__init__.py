"""A real Kubernetes control plane and a throwaway PostgreSQL on one machine, without Docker.

Used by the tests, `make demo` and `shadowgate dev`: etcd, kube-apiserver and
kube-controller-manager are built from their Go modules (see hack/) and cached by version;
PostgreSQL comes from the machine's own server binaries.
"""

from shadowgate_dev.localenv.controlplane import ControlPlane
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.postgres import Postgres

__all__ = ["ComponentError", "ControlPlane", "Postgres"]

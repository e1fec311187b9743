"""Throwaway certificates for the local API server, the way controller-runtime's envtest makes them.

Three CAs: one signs the API server's serving certificate, one signs client certificates (the admin
user is CN=admin, O=system:masters), and a key pair signs service-account tokens. For the local node
(node.py) the same CAs also sign the kubelet's identities and the other node components' clients.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=7)


@dataclass(frozen=True)
class KeyPair:
    cert_path: Path
    key_path: Path


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256 is much faster to generate than RSA and every Kubernetes component accepts it.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


class CertificateAuthority:
    def __init__(self, directory: Path, name: str):
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        subject = _name(f"shadowgate-local-{name}-ca")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / f"{name}-ca.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key, directory / f"{name}-ca.key")

    def issue(
        self,
        directory: Path,
        file_stem: str,
        common_name: str,
        *,
        organization: str | None = None,
        server_names: tuple[str, ...] = (),
        server_ips: tuple[str, ...] = (),
    ) -> KeyPair:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        server = bool(server_names or server_ips)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names]
            alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pair = KeyPair(directory / f"{file_stem}.crt", directory / f"{file_stem}.key")
        pair.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key_path)
        return pair


@dataclass(frozen=True)
class NodePki:
    """The local node's identities: the kubelet (to the API server and as a server), the API server
    as the kubelet's client, kube-proxy and kube-scheduler, each with the name RBAC's bootstrap
    policy or the Node authorizer knows."""

    kubelet_client: KeyPair
    kubelet_serving: KeyPair
    apiserver_kubelet_client: KeyPair
    kube_proxy: KeyPair
    kube_scheduler: KeyPair


@dataclass(frozen=True)
class ControlPlanePki:
    serving_ca: Path
    serving: KeyPair
    client_ca: Path
    admin: KeyPair
    service_account_public_key: Path
    service_account_private_key: Path
    node: NodePki | None = None


def make_control_plane_pki(
    directory: Path, *, server_ips: tuple[str, ...] = ("127.0.0.1", "10.0.0.1"), node: tuple[str, str] | None = None
) -> ControlPlanePki:
    """Write every certificate and key the local control plane needs into `directory`.

    `server_ips` go into the API server's certificate (where clients and pods reach it: its address and
    the `kubernetes` Service's IP); `node` = (name, IP) also issues the local node's identities.
    """
    directory.mkdir(parents=True, exist_ok=True)
    serving_ca = CertificateAuthority(directory, "serving")
    serving = serving_ca.issue(
        directory,
        "apiserver",
        "kube-apiserver",
        server_names=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        server_ips=server_ips,
    )
    client_ca = CertificateAuthority(directory, "client")
    admin = client_ca.issue(directory, "admin", "admin", organization="system:masters")
    node_pki = None
    if node is not None:
        node_name, node_ip = node
        node_pki = NodePki(
            kubelet_client=client_ca.issue(
                directory, "kubelet-client", f"system:node:{node_name}", organization="system:nodes"
            ),
            kubelet_serving=serving_ca.issue(
                directory, "kubelet-serving", node_name, server_names=(node_name,), server_ips=(node_ip,)
            ),
            apiserver_kubelet_client=client_ca.issue(
                directory, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", organization="system:masters"
            ),
            kube_proxy=client_ca.issue(directory, "kube-proxy", "system:kube-proxy"),
            kube_scheduler=client_ca.issue(directory, "kube-scheduler", "system:kube-scheduler"),
        )
    # Service-account tokens: RSA, since some token consumers still expect RS256.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_private = directory / "sa.key"
    sa_public = directory / "sa.pub"
    _write_key(sa_key, sa_private)
    sa_public.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return ControlPlanePki(
        serving_ca=serving_ca.cert_path,
        serving=serving,
        client_ca=client_ca.cert_path,
        admin=admin,
        service_account_public_key=sa_public,
        service_account_private_key=sa_private,
        node=node_pki,
    )

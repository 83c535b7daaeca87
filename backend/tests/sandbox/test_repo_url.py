"""Repository URLs from hostile users: non-public addresses refused, the clone pinned to the
address checked, one coarse failure message, stalls cut short, and sizes checked before checkout.

Real parts only: the system resolver (``localhost`` and literal addresses, no /etc/hosts edits),
real git, loopback TCP and TLS servers of our own, and inotify to see what a clone wrote.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest

from app.sandbox.workspace import (
    FETCH_FAILED,
    CloneError,
    InvalidRepoURL,
    _Git,
    _Target,
    address_refusal,
    clone_repository,
    resolve_host,
    validate_repo_url,
)

# -- the address classifier -----------------------------------------------------------------------

REFUSED_ADDRESSES = {
    "0.0.0.0": "unspecified",
    "0.1.2.3": "private",  # "this network"
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "10.0.0.1": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",  # cloud metadata
    "100.64.0.1": "shared",  # carrier-grade NAT
    "100.127.255.254": "shared",
    "192.0.0.8": "private",  # IETF protocol assignments
    "192.0.0.200": "private",
    "192.88.99.1": "private",  # 6to4 relay anycast
    "192.0.2.1": "private",  # documentation
    "198.18.0.1": "private",  # benchmarking
    "198.51.100.7": "private",
    "203.0.113.9": "private",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "private|reserved",
    "255.255.255.255": "private",  # broadcast
    "::": "unspecified",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fc00::1": "private",  # unique local
    "fd12:3456:789a::1": "private",
    "fec0::1": "site-local",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "2001:db8::1": "private",  # documentation
    "::ffff:127.0.0.1": "loopback.* \\(inside an IPv6 address\\)",  # IPv4-mapped
    "::ffff:10.1.2.3": "private.* \\(inside an IPv6 address\\)",
    "::ffff:169.254.169.254": "link-local.* \\(inside an IPv6 address\\)",
    "64:ff9b::7f00:1": "loopback.* \\(inside an IPv6 address\\)",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe": "link-local.* \\(inside an IPv6 address\\)",
    "64:ff9b:1::1": "NAT64",  # local-use NAT64
    "2002:7f00:1::1": "loopback.* \\(inside an IPv6 address\\)",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1": "private.* \\(inside an IPv6 address\\)",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
    "::7f00:1": "reserved",  # IPv4-compatible (deprecated)
    "100::1": "private",  # discard-only
    "3fff::1": "private",  # documentation
    "5f00::1": "private",  # SRv6
}
PUBLIC_ADDRESSES = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "140.82.112.3",
    "100.63.255.255",  # just below the shared space
    "100.128.0.0",  # just above it
    "172.15.255.255",
    "172.32.0.0",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize(("address", "reason"), sorted(REFUSED_ADDRESSES.items()))
def test_non_public_addresses_are_refused_with_their_kind(address: str, reason: str) -> None:
    refusal = address_refusal(ip_address(address))

    assert refusal is not None
    assert re.search(reason, refusal), refusal


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ip_address(address)) is None


def test_a_scoped_ipv6_address_is_refused() -> None:
    assert address_refusal(IPv6Address("fe80::1%2")) is not None


# -- URLs at submission (no DNS) ------------------------------------------------------------------

LOCAL_URLS = [
    "https://localhost/r.git",
    "https://LOCALHOST:8443/r.git",
    "https://git.localhost/r.git",
    "https://127.0.0.1/r.git",
    "https://127.0.0.1:5432/x",
    "https://127.1/r.git",  # 127.0.0.1 as URL parsers read it
    "https://0x7f.1/r.git",
    "https://0x7f000001/r.git",
    "https://2130706433/r.git",
    "https://0177.0.0.1/r.git",
    "https://[::1]/r.git",
    "https://[::ffff:127.0.0.1]/r.git",
    "https://[::ffff:7f00:1]/r.git",
    "https://[64:ff9b::7f00:1]/r.git",
    "https://10.0.0.1/r.git",
    "https://192.168.0.10:3000/r.git",
    "https://169.254.169.254/latest/meta-data",
    "https://100.64.0.1/r.git",
    "https://0.0.0.0/r.git",
    "https://[fe80::1]/r.git",
    "https://[fd00::1]/r.git",
    "https://224.0.0.1/r.git",
]


@pytest.mark.parametrize("url", LOCAL_URLS)
def test_a_user_may_not_name_a_local_or_private_host(url: str) -> None:
    with pytest.raises(InvalidRepoURL, match=r"refused|dotted-decimal"):
        validate_repo_url(url, allow_local=False, allow_private_hosts=False)


@pytest.mark.parametrize("url", LOCAL_URLS)
def test_an_administrator_may_name_a_local_host(url: str) -> None:
    assert validate_repo_url(url, allow_local=True, allow_private_hosts=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/example/repo",
        "https://git.example.com:8443/team/repo.git",
        "https://140.82.112.3/example/repo.git",
        "https://[2606:4700:4700::1111]/repo.git",
        "https://10.0.0.1.example.com/repo.git",  # a name, resolved (and checked) at clone time
    ],
)
def test_a_user_may_name_a_public_host(url: str) -> None:
    assert validate_repo_url(url, allow_local=False, allow_private_hosts=False) == url


@pytest.mark.parametrize(
    "url", ["https://[fe80::1%25eth0]/r.git", "https://[not-an-address]/r.git", "https://[::1/r"]
)
def test_malformed_ipv6_hosts_are_refused_for_everyone(url: str) -> None:
    with pytest.raises(InvalidRepoURL):
        validate_repo_url(url, allow_private_hosts=True)


# -- resolution at clone time --------------------------------------------------------------------


def test_every_address_a_name_resolves_to_is_checked() -> None:
    with pytest.raises(InvalidRepoURL, match=r"localhost resolves to 127\.0\.0\.1.*loopback"):
        resolve_host("localhost", 443, allow_private_hosts=False)


def test_an_administrator_resolves_local_names() -> None:
    assert IPv4Address("127.0.0.1") in resolve_host("localhost", 443, allow_private_hosts=True)


def test_a_numeric_host_reads_as_url_parsers_read_it_for_an_administrator() -> None:
    for host in ("0x7f.1", "2130706433", "127.1", "0177.0.0.1"):
        assert resolve_host(host, 443, allow_private_hosts=True) == [IPv4Address("127.0.0.1")]


@dataclass
class Listener:
    """A loopback TCP port: ``tarpit`` accepts and never answers, ``tls`` completes a TLS
    handshake with a self-signed certificate, ``closed`` refuses connections."""

    port: int
    host: str = "127.0.0.1"
    connections: list[str | None] = field(default_factory=list)  # the SNI name of each


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _serve(server: socket.socket, listener: Listener, context: ssl.SSLContext | None) -> None:
    held: list[socket.socket] = []
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            break
        if context is None:
            listener.connections.append(None)
            held.append(conn)  # the tarpit: hold it, say nothing
            continue
        listener.connections.append(_tls_server_name(context, conn))
    for conn in held:
        conn.close()


def _tls_server_name(context: ssl.SSLContext, conn: socket.socket) -> str | None:
    """Complete a TLS handshake on ``conn``; the server name (SNI) the client asked for."""
    names: list[str | None] = []

    def note(_sock: object, name: str | None, _ctx: object) -> None:
        names.append(name)

    context.sni_callback = note
    conn.settimeout(5)
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
    except OSError:
        pass
    return names[0] if names else None


@pytest.fixture
def tarpit() -> Iterator[Listener]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        listener = Listener(port=server.getsockname()[1])
        thread = threading.Thread(target=_serve, args=(server, listener, None), daemon=True)
        thread.start()
        yield listener
        server.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Listener]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        listener = Listener(port=server.getsockname()[1])
        thread = threading.Thread(target=_serve, args=(server, listener, context), daemon=True)
        thread.start()
        yield listener
        server.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens on it now: connections are refused


def _clone(url: str, dest: Path, *, admin: bool, **kwargs: float) -> ClonedOrError:
    started = time.monotonic()
    try:
        clone_repository(
            url,
            dest,
            timeout_s=kwargs.get("timeout_s", 30),
            max_size_mb=10,
            allow_local=admin,
            allow_private_hosts=admin,
            report_git_output=admin,
            connect_timeout_s=kwargs.get("connect_timeout_s", 2),
        )
    except (CloneError, InvalidRepoURL) as exc:
        return ClonedOrError(exc, time.monotonic() - started)
    return ClonedOrError(None, time.monotonic() - started)


@dataclass
class ClonedOrError:
    error: Exception | None
    seconds: float


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "[::ffff:127.0.0.1]"])
def test_a_users_clone_of_a_local_host_never_connects(
    tls_server: Listener, tmp_path: Path, host: str
) -> None:
    outcome = _clone(f"https://{host}:{tls_server.port}/repo.git", tmp_path / "c", admin=False)

    assert isinstance(outcome.error, InvalidRepoURL)
    assert "refused" in str(outcome.error) or "dotted-decimal" in str(outcome.error)
    assert tls_server.connections == []
    assert not (tmp_path / "c").exists()


def test_an_administrators_clone_may_reach_a_local_host(
    tls_server: Listener, tmp_path: Path
) -> None:
    outcome = _clone(f"https://localhost:{tls_server.port}/repo.git", tmp_path / "c", admin=True)

    assert isinstance(outcome.error, CloneError)  # our self-signed certificate: git refuses it
    assert "certificate" in str(outcome.error).lower()  # git's own words, for an administrator
    assert len(tls_server.connections) >= 2  # our handshake, then git's


def test_git_connects_to_the_pinned_address_whatever_dns_says(
    tls_server: Listener, tmp_path: Path
) -> None:
    # The name resolves nowhere (.invalid, RFC 6761): git can only reach the server through the
    # pin, exactly as a clone pins the address it checked.
    name = "asa-pinned.invalid"
    target = _Target(name, tls_server.port, IPv4Address("127.0.0.1"), literal=False)
    git = _Git(https=True, deadline=time.monotonic() + 20, isolation=None, target=target)

    result = git.run(
        ["ls-remote", "--", f"https://{name}:{tls_server.port}/repo.git"],
        cwd=tmp_path,
        action="git ls-remote",
        check=False,
    )

    assert result.exit_code != 0  # the certificate is not trusted, but the server was reached
    assert tls_server.connections == [name]  # git's TLS handshake, naming the host it asked for


def test_a_tarpit_is_given_up_on_after_the_connect_timeout(
    tarpit: Listener, tmp_path: Path
) -> None:
    outcome = _clone(
        f"https://127.0.0.1:{tarpit.port}/repo.git",
        tmp_path / "c",
        admin=True,
        timeout_s=120,
        connect_timeout_s=1,
    )

    assert isinstance(outcome.error, CloneError)
    assert "timed out waiting for a TLS answer" in str(outcome.error)
    assert outcome.seconds < 60  # not the clone's 120 s deadline
    assert tarpit.connections == [None]  # git itself never ran against it


def test_a_user_gets_one_and_the_same_reason_for_every_network_failure(
    tls_server: Listener, tarpit: Listener, closed_port: int, tmp_path: Path
) -> None:
    urls = {
        "refused": f"https://127.0.0.1:{closed_port}/repo.git",
        "tarpit": f"https://127.0.0.1:{tarpit.port}/repo.git",
        "tls and git": f"https://127.0.0.1:{tls_server.port}/repo.git",
        "no such host": "https://asa-no-such-host.invalid/repo.git",
    }
    as_user: dict[str, str] = {}
    as_admin: dict[str, str] = {}
    for what, url in urls.items():
        for admin, reasons in ((False, as_user), (True, as_admin)):
            dest = tmp_path / f"{what}-{admin}".replace(" ", "-")
            started = time.monotonic()
            try:
                clone_repository(
                    url,
                    dest,
                    timeout_s=30,
                    max_size_mb=10,
                    allow_private_hosts=True,  # past the address check, to reach the network
                    report_git_output=admin,
                    connect_timeout_s=1,
                )
            except CloneError as exc:
                reasons[what] = str(exc)
            assert time.monotonic() - started < 30
            assert not dest.exists()

    assert set(as_user.values()) == {FETCH_FAILED}, as_user
    assert len(set(as_admin.values())) == len(urls), as_admin  # an administrator sees why
    assert "refused" in as_admin["refused"]
    assert "timed out" in as_admin["tarpit"]
    assert "does not resolve" in as_admin["no such host"]


# -- size before checkout ------------------------------------------------------------------------

IN_CREATE, IN_MOVED_TO = 0x100, 0x80


class CreatedNames:
    """The names created in one directory, seen through inotify (Linux)."""

    def __init__(self, directory: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self._fd < 0:
            pytest.skip("inotify is not available")
        if self._libc.inotify_add_watch(self._fd, bytes(directory), IN_CREATE | IN_MOVED_TO) < 0:
            pytest.skip("inotify cannot watch the directory")

    def read(self) -> list[str]:
        names: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                raw = data[offset + 16 : offset + 16 + length]
                if mask & (IN_CREATE | IN_MOVED_TO):
                    names.append(raw.rstrip(b"\0").decode())
                offset += 16 + length
        os.close(self._fd)
        return names


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_one_blob_at_many_paths_is_refused_before_it_is_checked_out(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _git(source, "init", "-q", "-b", "main")
    blob = b"\0" * (1024 * 1024)  # 1 MB that packs into a few hundred bytes
    for index in range(25):
        (source / f"copy{index:02}.bin").write_bytes(blob)
    _git(source, "add", ".")
    _git(source, "commit", "-q", "-m", "25 paths, one blob")
    dest = tmp_path / "clone"
    dest.mkdir()
    created = CreatedNames(dest)

    with pytest.raises(CloneError, match=r"over the 10\.0 MB limit") as refused:
        clone_repository(str(source), dest, timeout_s=60, max_size_mb=10)

    names = created.read()
    assert ".git" in names  # the clone itself ran
    assert not [name for name in names if name.endswith(".bin")]  # nothing was checked out
    assert list(dest.iterdir()) == []
    assert re.search(r"would take 25\.\d MB once checked out", str(refused.value))


def test_a_checkout_under_the_limit_is_measured_and_made(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _git(source, "init", "-q", "-b", "main")
    for index in range(3):
        (source / f"copy{index}.bin").write_bytes(b"\0" * (1024 * 1024))
    (source / "dir with space").mkdir()
    (source / "dir with space" / "x.txt").write_text("x\n")
    _git(source, "add", ".")
    _git(source, "commit", "-q", "-m", "3 MB")

    cloned = clone_repository(str(source), tmp_path / "clone", timeout_s=60, max_size_mb=10)

    assert (cloned.path / "copy2.bin").stat().st_size == 1024 * 1024
    assert (cloned.path / "dir with space" / "x.txt").read_text() == "x\n"

"""Push and pull through a real registry (distribution 2.8): chunks, sharing, digests, and each
way a registry can fail a pull (401, 404, 500, a manifest naming a missing blob, a corrupted blob),
each an error naming the id and the tier, with nothing half-made."""
from __future__ import annotations

import os

import pytest

from tiers import REGISTRY, TierError
from tiers.catalog import Record
from tiers.ids import new_id
from tiers.registry import Credentials, Registry, load_credentials
from tiers.transfer import inspect, pull, push

from conftest import make_image  # noqa: E402 - the tier tests' shared helper


def _record(cid, ns="default", pod_ns="", name=("c1",)):
    return Record(id=cid, namespace=ns, pod_namespace=pod_ns, name=name, container_id=name[-1], created=1.0)


def _registry(reg, repo, creds=True):
    return Registry(reg.reference(repo), plain_http=True,
                    credentials=load_credentials(str(reg.credentials_file)) if creds else Credentials())


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_push_then_pull_gives_the_same_bytes_and_shares_unchanged_chunks(registry, tmp_path):
    reg = _registry(registry, "kyb/roundtrip")
    pages = os.urandom(5 << 20)
    first = make_image(tmp_path / "a" / (a := new_id()), pages)
    pushed = push(reg, str(first), _record(a), 1 << 20, 4)
    assert pushed.shared_bytes == 0 and pushed.sent_bytes == pushed.total_bytes
    # a second checkpoint of the container: one MiB of its pages changed
    changed = bytearray(pages)
    changed[2 << 20:(2 << 20) + 10] = os.urandom(10)
    second = make_image(tmp_path / "b" / (b := new_id()), bytes(changed))
    again = push(reg, str(second), _record(b), 1 << 20, 4)
    assert 4 << 20 <= again.shared_bytes < 5 << 20, again  # 4 of the 5 page chunks were already there
    image = inspect(reg, b, ("default", ""))
    out = tmp_path / "out"
    out.mkdir()
    path = pull(reg, image, str(out), 4)
    assert _files(second) == _files(out / b)
    assert [p.name for p in out.iterdir()] == [b]  # no hidden pull dir left


def test_pushing_again_sends_nothing(registry, tmp_path):
    reg = _registry(registry, "kyb/again")
    img = make_image(tmp_path / (cid := new_id()))
    push(reg, str(img), _record(cid), 1 << 20, 2)
    again = push(reg, str(img), _record(cid), 1 << 20, 2)
    assert again.sent_bytes == 0 and again.shared_bytes == again.total_bytes


def test_unknown_id_is_unknown_in_the_registry(registry):
    reg = _registry(registry, "kyb/empty")
    cid = new_id()
    with pytest.raises(TierError) as err:
        inspect(reg, cid, ("default", ""))
    assert err.value.kind == "unknown" and err.value.tier == REGISTRY and cid in str(err.value)


def test_wrong_credentials_are_401(registry, tmp_path):
    reg = Registry(registry.reference("kyb/auth"), plain_http=True, credentials=Credentials("kyb", "wrong"))
    with pytest.raises(TierError) as err:
        reg.ping()
    assert err.value.kind == "unauthorized" and "401" in str(err.value)
    assert "wrong" not in str(err.value)
    with pytest.raises(TierError) as err:
        push(reg, str(make_image(tmp_path / (cid := new_id()))), _record(cid), 1 << 20, 2)
    assert err.value.kind == "unauthorized" and cid in str(err.value) and "registry" in str(err.value)


def test_a_checkpoint_of_another_scope_is_refused_before_its_blobs(registry, tmp_path):
    reg = _registry(registry, "kyb/scope")
    img = make_image(tmp_path / (cid := new_id()))
    push(reg, str(img), _record(cid, ns="k8s.io", pod_ns="team-a", name=("p", "c")), 1 << 20, 2)
    with pytest.raises(TierError) as err:
        inspect(reg, cid, ("k8s.io", "team-b"))
    assert err.value.kind == "foreign-scope" and "team-a" in str(err.value)
    assert inspect(reg, cid, ("k8s.io", "team-a")).name == ("p", "c")


def test_server_error_is_named_and_nothing_is_left(registry, proxy, tmp_path):
    good = _registry(registry, "kyb/five")
    img = make_image(tmp_path / (cid := new_id()))
    push(good, str(img), _record(cid), 1 << 20, 2)
    reg = Registry(proxy.reference("kyb/five"), plain_http=True,
                   credentials=load_credentials(str(registry.credentials_file)))
    image = inspect(reg, cid, ("default", ""))
    proxy.fault = lambda method, path: 500 if "/blobs/" in path and method == "GET" else None
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TierError) as err:
        pull(reg, image, str(out), 4)
    assert err.value.kind == "server-error" and "500" in str(err.value) and cid in str(err.value)
    assert list(out.iterdir()) == []


def test_a_manifest_naming_a_missing_blob_fails_the_pull_whole(registry, tmp_path):
    reg = _registry(registry, "kyb/missing")
    img = make_image(tmp_path / (cid := new_id()))
    push(reg, str(img), _record(cid), 1 << 20, 2)
    image = inspect(reg, cid, ("default", ""))
    victim = image.files[[f[0] for f in image.files].index("pages-1.img")][3][1][0]
    registry.layer_link("kyb/missing", victim).joinpath("link").unlink()   # the repository forgets it
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TierError) as err:
        pull(reg, image, str(out), 4)
    assert err.value.kind == "missing-blob" and victim in str(err.value)
    assert list(out.iterdir()) == []


def test_a_corrupted_blob_is_refused(registry, tmp_path):
    reg = _registry(registry, "kyb/corrupt")
    img = make_image(tmp_path / (cid := new_id()))
    push(reg, str(img), _record(cid), 1 << 20, 2)
    image = inspect(reg, cid, ("default", ""))
    victim = image.files[[f[0] for f in image.files].index("pages-1.img")][3][0][0]
    data = registry.blob_data(victim)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TierError) as err:
        pull(reg, image, str(out), 4)
    assert err.value.kind == "corrupt" and victim in str(err.value) and cid in str(err.value)
    assert list(out.iterdir()) == []


def test_bearer_token_auth_of_hosted_registries(registry, tmp_path):
    from tests.registry_support import FaultProxy

    proxy = FaultProxy(registry, bearer=True).start()
    try:
        creds = load_credentials(str(registry.credentials_file))
        reg = Registry(proxy.reference("kyb/bearer"), plain_http=True, credentials=creds)
        img = make_image(tmp_path / (cid := new_id()))
        pushed = push(reg, str(img), _record(cid), 1 << 20, 4)
        assert pushed.sent_bytes == pushed.total_bytes
        assert proxy.token_requests and "service=kyb-test" in proxy.token_requests[0]
        assert "scope=repository%3Akyb%2Fbearer%3Apull%2Cpush" in proxy.token_requests[0]
        assert inspect(reg, cid, ("default", "")).total_bytes == pushed.total_bytes
        wrong = Registry(proxy.reference("kyb/bearer"), plain_http=True, credentials=Credentials("kyb", "nope"))
        with pytest.raises(TierError) as err:
            wrong.ping()
        assert err.value.kind == "unauthorized" and "token service" in str(err.value)
    finally:
        proxy.stop()

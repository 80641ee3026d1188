"""The blob-store contract, stated once and run over every backend (the local folder and a real
S3 server, SeaweedFS), as Flower runs one state test over each of its storage backends."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request

import pytest

from coordinator.model.store import BlobStore, Store, open_store, upload_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store("", tmp_path)
    return request.getfixturevalue("s3_store")


def test_put_get_is_content_addressed(store: Store) -> None:
    data = b"hello nomoat" * 1000
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.put(data) == sha  # again: a no-op
    assert store.has(sha) and store.size(sha) == len(data)
    assert store.get(sha) == data
    assert store.get_range(sha, 5, 17) == data[5:17]
    assert store.get_range(sha, 3, 3) == b""
    assert b"".join(store.chunks(sha, 4096, start=100)) == data[100:]


def test_missing_and_delete(store: Store) -> None:
    sha = store.put(b"short-lived")
    other = hashlib.sha256(b"never stored").hexdigest()
    assert not store.has(other)
    with pytest.raises(FileNotFoundError):
        store.get(other)
    store.delete(sha)
    store.delete(sha)  # twice is fine
    assert not store.has(sha)


def test_list_names_every_blob(store: Store) -> None:
    shas = {store.put(bytes([i]) * (i + 1)) for i in range(5)}
    with store.staging() as where:  # staging files are not blobs until adopted
        (where / "x").write_bytes(b"staged")
        listed = {b.sha256: b for b in store.list()}
        assert set(listed) == shas
        adopted = store.adopt_folder(where)
    assert {b.sha256 for b in store.list()} == shas | set(adopted.values())
    assert all(abs(b.modified - time.time()) < 600 and b.size == store.size(b.sha256) for b in store.list())


def test_files_in_and_out(store: Store, tmp_path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x01\x02" * 300_000)
    sha = store.put_file(source)
    assert store.size(sha) == 600_000
    target = tmp_path / "out.bin"
    store.fetch(sha, target)
    assert target.read_bytes() == source.read_bytes()


def test_rejects_names_that_are_not_hashes(store: Store) -> None:
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    with pytest.raises(ValueError):
        upload_key("t/../x", 1, "0" * 64)


def test_presigned_urls(store: Store) -> None:
    """A direct store's GET URL reads its one blob (ranges too) and expires; its PUT URL writes
    only its own upload, and the coordinator reads that back. A local folder hands out none."""
    data = b"0123456789" * 100
    sha = store.put(data)
    url = store.presign_get(sha, 60)
    if not store.direct:
        assert url == "" and store.presign_put(upload_key("t", 1, sha), 60) == ""
        return
    assert urllib.request.urlopen(url).read() == data
    ranged = urllib.request.Request(url, headers={"Range": "bytes=990-"})
    assert urllib.request.urlopen(ranged).read() == data[990:]
    other = store.put(b"another blob")
    with pytest.raises(urllib.error.HTTPError):  # the signature names one object
        urllib.request.urlopen(url.replace(sha, other))
    short = store.presign_get(sha, 1)
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(short)

    key = upload_key("task-1", 7, sha)
    put = urllib.request.Request(store.presign_put(key, 60), data=data, method="PUT")
    put.add_header("Content-Type", "")
    urllib.request.urlopen(put)
    assert store.read_upload(key, limit=len(data)) == data
    assert store.read_upload(key, limit=len(data) - 1) is None  # bigger than allowed: not read
    assert [u.sha256 for u in store.uploads()] == [key]
    assert sha not in {u.sha256 for u in store.uploads()}
    store.delete_upload(key)
    assert store.read_upload(key, limit=len(data)) is None


def test_local_default_is_the_data_dir(tmp_path) -> None:
    store = open_store("", tmp_path)
    assert isinstance(store, BlobStore) and store.root == tmp_path / "blobs"
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("gs://x", tmp_path)


def test_the_endpoint_comes_from_the_settings_else_the_aws_chain(seaweed, monkeypatch) -> None:
    """``--store-endpoint`` (Settings.store_endpoint) names the server; without it boto3's standard
    chain (AWS_ENDPOINT_URL here) does. Credentials stay the standard AWS variables either way."""
    import uuid

    from coordinator.model.store import StoreError
    from coordinator.settings import Settings
    from tests.seaweed import use

    use(seaweed, monkeypatch)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    settings = Settings(data_dir=None, store=f"s3://nomoat-test/{uuid.uuid4().hex[:12]}",
                        store_endpoint=seaweed.endpoint)
    named = open_store(settings.store, None, settings.store_endpoint)
    assert named.s3.meta.endpoint_url == seaweed.endpoint and named.get(named.put(b"here")) == b"here"
    assert named.presign_get(named.put(b"here"), 60).startswith(f"{seaweed.endpoint}/nomoat-test/")  # path style
    with pytest.raises(StoreError, match="--store-endpoint 127.0.0.1:1: give the object store's URL"):
        open_store(settings.store, None, "127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    chained = open_store(settings.store, None)
    assert chained.s3.meta.endpoint_url == seaweed.endpoint and chained.get(named.put(b"here")) == b"here"

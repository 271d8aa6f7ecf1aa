"""Sources: folders, globs, manifests (parquet / jsonl / csv) and fsspec URLs, local and over HTTP."""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.build import build
from pipeline.sources import list_sources, local_copy, read_manifest

from helpers import small_config

EXT = [".mp4", ".mkv", ".m4a"]


@pytest.fixture
def tree(tmp_path):
    for name in ["b.mp4", "a.mp4", "sub/c.mkv", "sub/deeper/d.mp4", "notes.txt", "sub/e.MP4"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folder_is_listed_recursively_sorted_and_filtered(tree):
    got = list_sources(str(tree), EXT)
    assert [os.path.relpath(p, tree) for p in got] == ["a.mp4", "b.mp4", "sub/c.mkv", "sub/deeper/d.mp4", "sub/e.MP4"]
    flat = list_sources(str(tree), EXT, recursive=False)
    assert [os.path.relpath(p, tree) for p in flat] == ["a.mp4", "b.mp4"]


def test_glob_and_file_url(tree):
    got = list_sources(str(tree / "sub" / "*.mkv"), EXT)
    assert [os.path.relpath(p, tree) for p in got] == ["sub/c.mkv"]
    assert len(list_sources(f"file://{tree}", EXT)) == 5


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_manifests_keep_order_duplicates_and_resolve_relative_paths(tree, fmt):
    rows = [{"path": "b.mp4"}, {"path": str(tree / "a.mp4")}, {"path": "b.mp4"}, {"path": "missing.mp4"}]
    manifest = tree / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    elif fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        manifest.write_text("path\n" + "\n".join(r["path"] for r in rows) + "\n")
    got = list_sources(str(manifest), EXT)
    assert got == [f"{tree}/b.mp4", str(tree / "a.mp4"), f"{tree}/b.mp4", f"{tree}/missing.mp4"]


def test_manifest_without_a_path_column_says_so(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"name": "a.mp4"}\n')
    with pytest.raises(ValueError, match="none of the columns"):
        read_manifest(str(manifest))


def test_missing_input_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder, a glob, a manifest nor a file"):
        list_sources(str(tmp_path / "nope"), EXT)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Enough of HTTP range requests for fsspec's seekable files."""

    def log_message(self, *args):
        pass

    def send_head(self):
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        import io

        return io.BytesIO(data[start : end + 1])


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_local_copy_downloads_urls(http_root):
    root, url = http_root
    (root / "x.mp4").write_bytes(b"0123456789" * 1000)
    with local_copy(f"{url}/x.mp4") as path:
        assert Path(path).read_bytes() == b"0123456789" * 1000
    assert not Path(path).exists()  # the temporary copy is gone


def test_http_manifest_through_the_ray_pipeline(ray_local, media_dir, http_root, tmp_path):
    root, url = http_root
    shutil.copy(media_dir / "video_0.mp4", root / "video_0.mp4")
    manifest = tmp_path / "remote.csv"
    manifest.write_text(f"url\n{url}/video_0.mp4\n{url}/absent.mp4\n")
    record = build(str(manifest), str(tmp_path / "out"), small_config(), quiet=True)
    index = pads.dataset(str(tmp_path / "out" / "index")).to_table().to_pylist()
    rejects = pads.dataset(str(tmp_path / "out" / "rejects")).to_table().to_pylist()
    assert index and {r["source_path"] for r in index} == {f"{url}/video_0.mp4"}
    assert [(r["source_path"], r["reason"]) for r in rejects] == [(f"{url}/absent.mp4", "missing_file")]
    local = build(str(media_dir / "video_0.mp4"), str(tmp_path / "local"), small_config(**{"runner.engine": "loop"}), quiet=True)
    local_index = pads.dataset(str(tmp_path / "local" / "index")).to_table().to_pylist()
    # Same content, same source id, same clips: ids come from bytes, not names.
    assert sorted(r["key"] for r in index) == sorted(r["key"] for r in local_index)
    assert record["counts"]["sources_reconcile"] and local["counts"]["clips_reconcile"]

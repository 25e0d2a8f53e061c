"""Build spools: inside the index folder, removed after the build, and swept when a killed process
left one (only those of this host's ended processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vector_sets import DIM, catalog_ids, clustered

from cnclip.index import spool
from cnclip.index.lock import WriterLock
from cnclip.index.vectors import VectorIndex

# Makes one spool as this host and one as another host sharing the folder, then waits to be killed.
KILLED_BUILD = (
    "import sys, time\n"
    "from cnclip.index import spool\n"
    "with spool.spooling(sys.argv[1]) as mine:\n"
    "    (mine / 'vectors.npy').write_bytes(bytes(4096))\n"
    "    spool.this_host = lambda: 'nas-client-2'\n"
    "    with spool.spooling(sys.argv[1]) as theirs:\n"
    "        print(mine, theirs, flush=True)\n"
    "        time.sleep(600)\n"
)


def killed_build(root) -> tuple[str, str]:
    """The names of the spools a build killed with -9 left under `root`: (this host's, another host's)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        mine, theirs = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
    return Path(mine).name, Path(theirs).name


def chunks(n: int = 2000):
    ids, vectors = catalog_ids(n), clustered(n)
    return [(ids[s : s + 500], vectors[s : s + 500]) for s in range(0, n, 500)]


def test_the_next_build_sweeps_a_killed_builds_spool_but_keeps_live_and_other_hosts_ones(tmp_path):
    folder = tmp_path / "idx"
    root = folder / spool.SPOOL_FOLDER
    with spool.spooling(root) as live:
        mine, theirs = killed_build(root)
        assert {p.name for p in root.iterdir()} == {live.name, mine, theirs}
        VectorIndex.build_streaming(chunks(), 2000, DIM, kind="ivf-flat", nlist=16, folder=folder)
        assert {p.name for p in root.iterdir()} == {live.name, theirs}  # the killed build's own spool is gone
    assert not live.exists()


def test_a_build_spools_inside_the_index_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "idx"
    seen = []

    def watched():
        for chunk in chunks():
            seen.append(sorted(str(p.relative_to(folder)) for p in folder.rglob("*.npy")))
            yield chunk

    VectorIndex.build_streaming(watched(), 2000, DIM, kind="ivf-flat", nlist=16, folder=folder)
    assert len(seen[0]) == 1 and seen[0][0].startswith(f"{spool.SPOOL_FOLDER}/cnclip-spool-")
    assert list((folder / spool.SPOOL_FOLDER).iterdir()) == []


def test_a_writer_taking_the_lock_sweeps_a_killed_builds_spool(tmp_path):
    mine, theirs = killed_build(tmp_path / spool.SPOOL_FOLDER)
    with WriterLock(tmp_path).hold():
        assert [p.name for p in (tmp_path / spool.SPOOL_FOLDER).iterdir()] == [theirs]

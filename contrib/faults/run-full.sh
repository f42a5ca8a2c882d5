#!/usr/bin/env bash
# The long versions of the fault tests (not CI): 200 MB crash writes, 100 MB over
# 5 % loss and 100 ms each way, a 2-minute load, a minute of torn-read probing per
# case, the replication faults, fsck and the review regressions, then each fuzz
# target for FUZZ_MINUTES (default 10). Needs root (namespaces, tmpfs), /dev/fuse,
# ip, nft, tc.
#   bash contrib/faults/run-full.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
export SWARMFS_FAULTS_FULL=1
export SWARMFS_TORN_SECONDS=60
.venv/bin/pytest -v -rA tests/test_faults_crash.py tests/test_faults_network.py \
    tests/test_faults_disk.py tests/test_faults_load.py tests/test_hostile_peer.py \
    tests/test_replication_faults.py tests/test_fsck.py tests/test_torn_read.py \
    tests/test_review_fixes.py tests/test_fuzz_corpus.py "$@"
minutes=${FUZZ_MINUTES:-10}
for target in wire records; do
    .venv/bin/python fuzz/run.py "$target" --minutes "$minutes"
done

"""Tests on one real three-node Ray cluster on this machine (tests/fixtures_cluster.py), started
for this package and stopped when its last test ends, so that no other test shares the machine
with it."""

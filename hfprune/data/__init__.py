"""Datasets that ship as packages and load offline, for the main job and the benchmarks."""

"""Measuring tools every job uses: interleaved timing, peak memory, and what the machine is (CPU features,
threads, versions)."""

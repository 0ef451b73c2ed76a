"""What a run and `info` report: parameter and memory counts, throughput and MFU, tables and curves."""

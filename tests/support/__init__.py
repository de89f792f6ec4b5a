"""Test helpers that inject real faults: a throwaway Postgres cluster, a TCP proxy,
subprocess workers and a consistency check that reads the tables without the library."""

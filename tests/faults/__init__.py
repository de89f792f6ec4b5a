"""Fault injection: real faults (killed processes and servers, network, disk) on real databases."""

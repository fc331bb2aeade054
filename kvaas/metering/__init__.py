"""Metering: the append-only usage ledger and exact storage integration.

The cache service calls :mod:`kvaas.metering.hooks` inside its own transactions; the meters
are read back with :mod:`kvaas.metering.storage`.
"""

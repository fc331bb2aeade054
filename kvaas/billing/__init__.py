"""Billing: the price book, pricing usage into invoice lines, invoices, budgets, Stripe sync.

Only :mod:`kvaas.billing.stripe_sync` talks to Stripe.
"""

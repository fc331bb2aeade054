"""Body of the Stripe webhook's answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class WebhookAck(BaseModel):
    received: bool = True
    outcome: Literal["applied", "ignored", "duplicate"]

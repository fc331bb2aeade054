"""``POST /v1/stripe/webhook``: Stripe's invoice events, signature-verified, applied once."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request

from kvaas.api.deps import SessionDep, SettingsDep
from kvaas.api.errors import error_responses
from kvaas.api.schemas.stripe import WebhookAck
from kvaas.billing.stripe_sync import WebhookSignatureError, apply_event, verify_event
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


@router.post(
    "/stripe/webhook",
    summary="Receive a Stripe webhook event (invoice payment status)",
    description="Authenticated by the `Stripe-Signature` header (no API key): missing, 401; "
    "not verifying with `KVAAS_STRIPE_WEBHOOK_SECRET`, 400.",
    responses=error_responses(AuthenticationError, BadRequest, PermissionDenied),
)
async def stripe_webhook(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    stripe_signature: str | None = Header(None, alias="Stripe-Signature"),
) -> WebhookAck:
    secret = settings.stripe_webhook_secret
    if secret is None:
        raise PermissionDenied("Stripe webhooks are not configured (KVAAS_STRIPE_WEBHOOK_SECRET)")
    if not stripe_signature:
        raise AuthenticationError("the Stripe-Signature header is missing")
    payload = await request.body()
    try:
        event = verify_event(payload, stripe_signature, secret.get_secret_value())
    except WebhookSignatureError as e:
        raise BadRequest(str(e), param="Stripe-Signature") from e
    return WebhookAck(outcome=await apply_event(session, event))

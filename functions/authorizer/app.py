"""AuthorizerFunction: a TOKEN authorizer checking bearer API keys against their stored hashes."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerResponse,
    APIGatewayAuthorizerTokenEvent,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.errors import Unauthorized

logger = Logger()
tracer = Tracer()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # the policy names the principal: keep it out
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    token_event = APIGatewayAuthorizerTokenEvent(event)
    arn = token_event.parsed_arn
    try:
        principal = container.api_keys().authenticate(token_event.authorization_token)
    except Unauthorized as exc:
        logger.info("rejected API key", extra={"reason": exc.message})
        # API Gateway turns exactly this message into a 401 (a Deny policy would be a 403).
        raise Exception("Unauthorized") from None
    policy = APIGatewayAuthorizerResponse(
        principal_id=principal.user_id,
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
        context={"tenant_id": principal.tenant_id, "user_id": principal.user_id},
    )
    policy.allow_all_routes()
    return policy.asdict()

<?php

declare(strict_types=1);

namespace Keyd;

/** 401 from POST /v1/webhooks/verify: the webhook is not authentic or not fresh. */
class WebhookRejectedException extends ClientException
{
}

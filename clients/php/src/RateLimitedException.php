<?php

declare(strict_types=1);

namespace Keyd;

/** 429: the caller's grant rate is used up; slow down. */
class RateLimitedException extends ClientException
{
}

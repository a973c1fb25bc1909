<?php

declare(strict_types=1);

namespace Keyd;

/** 503 key_unavailable: the app's key is not loaded, or is past refresh.max_stale. */
class KeyUnavailableException extends UnavailableException
{
}

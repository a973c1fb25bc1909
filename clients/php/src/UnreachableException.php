<?php

declare(strict_types=1);

namespace Keyd;

/** keyd cannot be reached: no socket, no permission, refused, reset, timed out, or a bad answer. */
class UnreachableException extends ClientException
{
}

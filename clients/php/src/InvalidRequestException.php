<?php

declare(strict_types=1);

namespace Keyd;

/** keyd rejected the request itself (400, 404, 405, 413, 415, 422): fix the request. */
class InvalidRequestException extends ClientException
{
}

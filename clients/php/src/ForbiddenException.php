<?php

declare(strict_types=1);

namespace Keyd;

/** 403: no grant allows this caller (its uid, group or unit) to make this request. */
class ForbiddenException extends ClientException
{
}

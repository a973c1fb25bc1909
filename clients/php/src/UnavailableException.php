<?php

declare(strict_types=1);

namespace Keyd;

/** 5xx: keyd cannot answer right now (shutting down, at its connection limit, upstream error). */
class UnavailableException extends ClientException
{
}

<?php

declare(strict_types=1);

namespace Keyd;

/** What TalkJS answered to a call through keyd's REST proxy (4xx and 5xx included). */
final class RestResponse
{
    public function __construct(
        public readonly int $status,
        public readonly string $body,
        public readonly string $contentType,
        public readonly ?string $retryAfter,
    ) {
    }

    public function ok(): bool
    {
        return $this->status >= 200 && $this->status < 300;
    }

    /** The body decoded as JSON (null for an empty body); \JsonException when it is not JSON. */
    public function json(): mixed
    {
        return $this->body === '' ? null : json_decode($this->body, true, 512, JSON_THROW_ON_ERROR);
    }
}

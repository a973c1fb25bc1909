<?php

declare(strict_types=1);

namespace Keyd;

/**
 * Every error the client throws about keyd: getStatus() is the HTTP status (0 when keyd was not
 * reached), getErrorCode() the API's code. Never carries a response body (an answer can hold a token).
 */
class ClientException extends \RuntimeException
{
    public function __construct(private readonly int $status, private readonly string $errorCode, string $message)
    {
        parent::__construct($message);
    }

    public function getStatus(): int
    {
        return $this->status;
    }

    public function getErrorCode(): string
    {
        return $this->errorCode;
    }

    /** The subclass for an error answer, as keyd's Python client maps them. */
    public static function for(int $status, string $code, string $message): self
    {
        return match (true) {
            $status === 0 => new UnreachableException($status, $code, $message),
            $status === 401 => new WebhookRejectedException($status, $code, $message),
            $status === 403 => new ForbiddenException($status, $code, $message),
            $status === 429 => new RateLimitedException($status, $code, $message),
            $code === 'key_unavailable' => new KeyUnavailableException($status, $code, $message),
            $status >= 500 => new UnavailableException($status, $code, $message),
            $status >= 400 => new InvalidRequestException($status, $code, $message),
            default => new self($status, $code, $message),
        };
    }
}

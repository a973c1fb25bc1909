<?php
// The examples load the keyd/client package (clients/php) straight from this checkout. In your app,
// composer's autoloader does this: a path repository to keyd's clients/php (README, "Clients"),
// then require 'vendor/autoload.php'.

declare(strict_types=1);

spl_autoload_register(static function (string $class): void {
    if (str_starts_with($class, 'Keyd\\')) {
        $file = __DIR__ . '/../../clients/php/src/' . str_replace('\\', '/', substr($class, 5)) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});

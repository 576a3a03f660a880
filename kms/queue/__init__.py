"""The outbound queue: durable entries, MX/smarthost delivery with retries, and DSN bounces."""

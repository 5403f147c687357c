"""The packet and how it travels over HTTP and AMQP."""

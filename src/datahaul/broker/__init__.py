"""RabbitMQ plumbing: topology, connections, confirmed publishing."""

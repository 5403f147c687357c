"""Tests against a real three-node RabbitMQ cluster started on this machine."""

"""Training with SOAP or Adam."""

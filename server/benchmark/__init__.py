"""`genserve benchmark`: a streaming load generator for OpenAI and TGI endpoints."""

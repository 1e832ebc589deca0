"""OAuth tokens: storage, the token endpoint client, fresh tokens, install and webhooks."""

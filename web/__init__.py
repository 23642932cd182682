"""The web app served by the coordinator itself (docs/WEB.md): sign-in, /chat, /image,
account pages and the public /exchange, over the consumer API."""

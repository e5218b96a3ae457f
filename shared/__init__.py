"""What packerd and trainerd agree on: the chunk format, the manifest, the notification protocol, config."""

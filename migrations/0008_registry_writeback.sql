-- Registry write-backs (issue 16) ride the notifications queue: a promotion or a rollback is written back to
-- the model registry named in spec.registry as a row of format 'mlflow' (receiver 'registry:mlflow'), its
-- body what the registry is to be told, retried with backoff like any message. url_secret then names the
-- Secret holding the registry's credentials ('' when it needs none).
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_format_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_format_check
    CHECK (format IN ('cloudevents', 'slack', 'mlflow'));

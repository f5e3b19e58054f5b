package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

func placementKey(site, id string) string { return "writ:site:" + site + ":place:" + id }

// SetPlacement records coord's placement of a job on a dispatched site
// (the dispatcher reads it: the site queue carries the envelope only),
// kept for ttl.
func (r *Redis) SetPlacement(ctx context.Context, site, id, node string, ttl time.Duration) error {
	if err := r.rdb.Set(ctx, placementKey(site, id), node, ttl).Err(); err != nil {
		return fmt.Errorf("record placement: %w", err)
	}
	return nil
}

// Placement returns the node a job was placed on ("" for none).
func (r *Redis) Placement(ctx context.Context, site, id string) (string, error) {
	node, err := r.rdb.Get(ctx, placementKey(site, id)).Result()
	if errors.Is(err, redis.Nil) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read placement: %w", err)
	}
	return node, nil
}

package queue

import "strings"

// ACL roles: who uses a Redis, and so which keys it may touch.
const (
	ACLCoord      = "coord"
	ACLSupervisor = "supervisor"
	ACLRunner     = "runner"
)

// aclCommands are the commands every writ user may run: all but the
// dangerous and administrative ones (CONFIG, FLUSHALL, KEYS, DEBUG, ACL,
// SHUTDOWN …), plus what go-redis and asynq send that those categories
// hold (INFO for asynq's inspector, CLIENT SETNAME; Redis 7.0 has no CLIENT SETINFO, whose refusal go-redis ignores).
const aclCommands = "-@all +@read +@write +@keyspace +@list +@hash +@set +@sortedset +@string +@stream +@scripting +@transaction +@connection +@pubsub -@dangerous -@admin +info +client|setname +client|id"

// ACLRules are the Redis ACL rules (key patterns, channels, commands) of
// role on site's Redis, as tight as asynq allows: asynq keeps a queue's
// keys under asynq:{QUEUE}: and its servers and workers under
// asynq:servers and asynq:workers, and its cancel channel is asynq:cancel.
// coord touches only writ:coord:*; a supervisor its site's queue, the
// node queues it places jobs on, its site's events and replay guard; a
// runner the queues, its site's events and job ends, its site's
// cancellations (read only), and nothing of the replay guard or of coord.
func ACLRules(role, site string) string {
	asynqKeys := []string{
		"~asynq:{" + SiteQueue(site) + "}:*", "~asynq:{node:*}:*",
		"~asynq:queues", "~asynq:servers", "~asynq:servers:*", "~asynq:workers", "~asynq:workers:*",
	}
	var rules []string
	switch role {
	case ACLCoord:
		rules = []string{"~writ:coord:*", "&" + appliedChannel}
	case ACLSupervisor:
		rules = append(asynqKeys, "~writ:site:"+site+":*", "&asynq:cancel")
	case ACLRunner:
		rules = append(asynqKeys, "~"+eventStream(site), "~"+endKey(site, "*"), "%R~"+cancelKey(site, "*"), "%R~"+siteFlowKey(site, "*"), "&asynq:cancel")
	default:
		return "-@all"
	}
	return strings.Join(append(rules, aclCommands), " ")
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/seal"
)

// signFlags are the job fields set when signing (writ job sign, writ run).
type signFlags struct {
	key, site, node, name, argsFile string
	cpu, diskGB                     int
	memory                          string
	anySite                         bool
	args, secrets                   []string
	ledger                          string
	timeout, valid                  time.Duration
	maxRetries                      int
	ca                              caSource
}

func (f *signFlags) add(cmd *cobra.Command) {
	f.addSigning(cmd)
	fl := cmd.Flags()
	fl.StringVar(&f.node, "node", "", "pin the job to one node of the site")
	fl.BoolVar(&f.anySite, "any-site", false, "let coord send the job to any site whose signing policy it satisfies (and, with --cpu/--memory, where a node has room); --site becomes a preference")
	fl.IntVar(&f.cpu, "cpu", 0, "CPUs the job needs: coord places it on a node with them free (unless --node pins one)")
	fl.StringVar(&f.memory, "memory", "", "memory the job needs, e.g. 512M or 2G (placement, like --cpu)")
	fl.IntVar(&f.diskGB, "disk", 0, "disk the job needs, in GiB (placement, like --cpu)")
	fl.StringVar(&f.name, "name", "", "job name (default: the script's file name)")
	fl.StringArrayVar(&f.args, "arg", nil, "job argument key=value (repeatable); a value that is valid JSON is taken as JSON, else as a string")
	fl.StringVar(&f.argsFile, "args-file", "", "JSON object file of job arguments (--arg values override it)")
	fl.StringArrayVar(&f.secrets, "secret", nil, "secret NAME=VALUE or NAME=@FILE (repeatable): sealed to the key of the --node, or of every node of the --site (from the ledger), so only the runner that executes the job opens it; the script reads job.secrets.NAME. @FILE keeps the value out of the process list")
	fl.StringVar(&f.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, for the node keys --secret seals to (default $WRIT_LEDGER)")
	fl.DurationVar(&f.timeout, "timeout", envelope.DefaultTimeout, "how long one run may take")
	fl.DurationVar(&f.valid, "valid", envelope.DefaultValidity, "how long the signed job may be submitted and run")
	fl.IntVar(&f.maxRetries, "max-retries", envelope.DefaultMaxRetries, "retries after infrastructure failures")
}

// addSigning adds the flags every signed request needs (key, site) and
// sets the job defaults for commands that build their own job.
func (f *signFlags) addSigning(cmd *cobra.Command) {
	f.ca.cmd = cmd
	fl := cmd.Flags()
	fl.StringVar(&f.key, "key", "", "signing key file (default $WRIT_KEY, ~/.config/writ/key or ~/.ssh/id_ed25519)")
	fl.StringVar(&f.site, "site", os.Getenv(envSite), "site to run on (default $WRIT_SITE)")
	f.timeout, f.valid, f.maxRetries = time.Minute, envelope.DefaultValidity, 0
}

// parseArgs builds the args object from --args-file and --arg.
func (f *signFlags) parseArgs() (json.RawMessage, error) {
	obj := map[string]json.RawMessage{}
	if f.argsFile != "" {
		data, err := os.ReadFile(f.argsFile)
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(data, &obj); err != nil {
			return nil, fmt.Errorf("--args-file %s: must hold a JSON object: %w", f.argsFile, err)
		}
	}
	for _, kv := range f.args {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--arg %q: want key=value", kv)
		}
		if json.Valid([]byte(v)) {
			obj[k] = json.RawMessage(v)
		} else {
			b, _ := json.Marshal(v)
			obj[k] = b
		}
	}
	if len(obj) == 0 {
		return nil, nil
	}
	return json.Marshal(obj)
}

// sign reads the script file and returns the signed envelope.
func (f *signFlags) sign(scriptPath string) (*envelope.Envelope, error) {
	src, err := os.ReadFile(scriptPath)
	if err != nil {
		return nil, fmt.Errorf("read script: %w", err)
	}
	name := f.name
	if name == "" {
		name = strings.TrimSuffix(baseName(scriptPath), ".tengo")
	}
	return f.signSource(name, string(src))
}

// signSource signs src as a job called name.
func (f *signFlags) signSource(name, src string) (*envelope.Envelope, error) {
	k, err := loadKey(f.key)
	if err != nil {
		return nil, err
	}
	if f.site == "" && !f.anySite {
		return nil, fmt.Errorf("no site: pass --site, set $%s, or allow --any-site", envSite)
	}
	now := time.Now()
	j := envelope.NewJob(name, src, f.site, now)
	j.Node, j.AnySite = f.node, f.anySite
	mem, err := parseSizeFlag(f.memory, "--memory")
	if err != nil {
		return nil, err
	}
	j.Resources = envelope.Resources{CPU: f.cpu, MemoryMB: int(mem >> 20), DiskGB: f.diskGB}
	j.Expires = now.Add(f.valid).UTC().Truncate(time.Second)
	j.Timeout = envelope.Duration(f.timeout)
	j.MaxRetries = f.maxRetries
	if j.Args, err = f.parseArgs(); err != nil {
		return nil, err
	}
	if j.Secrets, err = f.sealSecrets(j); err != nil {
		return nil, err
	}
	return j.Sign(k)
}

// sealSecrets seals --secret values to the nodes that may run j: the
// pinned node, or every node of its site.
func (f *signFlags) sealSecrets(j *envelope.Job) (map[string]string, error) {
	if len(f.secrets) == 0 {
		return nil, nil
	}
	plain := map[string][]byte{}
	for _, kv := range f.secrets {
		name, v, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			return nil, errors.New("--secret: each takes NAME=VALUE or NAME=@FILE")
		}
		if file, isFile := strings.CutPrefix(v, "@"); isFile {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, fmt.Errorf("--secret %s: %w", name, err)
			}
			v = strings.TrimSuffix(string(b), "\n")
		}
		plain[name] = []byte(v)
	}
	if j.AnySite {
		return nil, errors.New("--secret needs the nodes it is sealed to: give --site (or --node), not --any-site")
	}
	s, err := clientSec(f.ca.path())
	if err != nil {
		return nil, err
	}
	lc := s.ledgerClient(f.ledger)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var recipients []string
	if j.Node != "" {
		n, err := lc.Node(ctx, j.Node)
		if err != nil {
			return nil, fmt.Errorf("--secret: node %s: %w", j.Node, err)
		}
		recipients = append(recipients, n.PublicKey)
	} else {
		nodes, err := lc.Nodes(ctx, j.Site)
		if err != nil {
			return nil, fmt.Errorf("--secret: nodes of site %s: %w", j.Site, err)
		}
		for _, n := range nodes {
			recipients = append(recipients, n.PublicKey)
		}
		if len(recipients) == 0 {
			return nil, fmt.Errorf("--secret: site %s has no registered node to seal to", j.Site)
		}
	}
	out := map[string]string{}
	for name, v := range plain {
		sealed, err := seal.Seal(v, recipients)
		if err != nil {
			return nil, fmt.Errorf("--secret %s: %w", name, err)
		}
		out[name] = sealed
	}
	return out, nil
}

func baseName(p string) string {
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[i+1:]
	}
	return p
}

func coordFlag(cmd *cobra.Command, dst *string) {
	cmd.Flags().StringVar(dst, "coord", envOr(envCoord, serviceURL(defaultCoordAddr)), "coord URL (default $WRIT_COORD)")
}

// coordFlags are what a command reading from coord needs: its address and
// the key that signs the requests (coord shows a user the jobs it may
// read).
type coordFlags struct {
	coord, key string
	ca         caSource
}

func (f *coordFlags) add(cmd *cobra.Command) {
	f.ca.cmd = cmd
	coordFlag(cmd, &f.coord)
	cmd.Flags().StringVar(&f.key, "key", "", "signing key that authenticates the requests (default $WRIT_KEY)")
}

func (f *coordFlags) client() (*coord.Client, error) {
	return newCoordClient(f.coord, f.key, nil, f.ca.path())
}

// newCoordClient is a coord client over TLS with s, or (s nil) the CA
// bundle ca, signing its requests with the key at keyPath.
func newCoordClient(url, keyPath string, s *sec, ca string) (*coord.Client, error) {
	k, err := loadKey(keyPath)
	if err != nil {
		return nil, err
	}
	if s == nil {
		if s, err = clientSec(ca); err != nil {
			return nil, err
		}
	}
	if err := s.checkURL(url, "--coord"); err != nil {
		return nil, err
	}
	return &coord.Client{BaseURL: url, Key: k, HTTP: s.client(0)}, nil
}

func jobCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "job",
		Short: "Sign, submit and follow jobs",
	}
	cmd.AddCommand(jobSignCommand(), jobCosignCommand(), jobSubmitCommand(), jobGetCommand(), jobListCommand(), jobWatchCommand(), jobCancelCommand())
	return cmd
}

type jobSignCmd struct {
	signFlags
	out string
}

func jobSignCommand() *cobra.Command {
	c := &jobSignCmd{}
	cmd := &cobra.Command{
		Use:   "sign SCRIPT",
		Short: "Sign a Tengo script as a job envelope (DSSE JSON)",
		Example: `  writ job sign deploy.tengo --site local --arg name=web -o deploy.job
  writ job cosign deploy.job --key bob.key     # a second signer, for k-of-n sites
  writ job submit deploy.job`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	cmd.Flags().StringVarP(&c.out, "output", "o", "-", "where to write the envelope (- for stdout)")
	return cmd
}

// Run signs the script.
func (c *jobSignCmd) Run(_ context.Context, args []string) error {
	env, err := c.sign(args[0])
	if err != nil {
		return err
	}
	return writeEnvelope(c.out, env)
}

func writeEnvelope(path string, env *envelope.Envelope) error {
	b, err := json.MarshalIndent(env, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if path == "-" || path == "" {
		_, err = os.Stdout.Write(b)
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	kind := "job"
	if env.PayloadType == envelope.FlowPayloadType {
		kind = "flow"
	}
	fmt.Fprintf(os.Stderr, "signed %s %s written to %s\n", kind, env.ID(), path)
	return nil
}

type jobCosignCmd struct{ key, out string }

func jobCosignCommand() *cobra.Command {
	c := &jobCosignCmd{}
	cmd := &cobra.Command{
		Use:   "cosign FILE",
		Short: "Add your signature to a signed job (for sites that require several signers)",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	cmd.Flags().StringVar(&c.key, "key", "", "signing key file (default $WRIT_KEY)")
	cmd.Flags().StringVarP(&c.out, "output", "o", "", "where to write the envelope (default: FILE, in place)")
	return cmd
}

// Run adds a signature.
func (c *jobCosignCmd) Run(_ context.Context, args []string) error {
	return cosign(args[0], c.key, c.out, func(data []byte) (*envelope.Envelope, error) {
		env, _, err := envelope.Parse(data)
		return env, err
	})
}

// cosign adds the signature of the key at keyPath to the envelope file
// path, after parse read it as what it must be, and writes it to out
// (path itself if out is "").
func cosign(path, keyPath, out string, parse func([]byte) (*envelope.Envelope, error)) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	env, err := parse(data)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	k, err := loadKey(keyPath)
	if err != nil {
		return err
	}
	env.Sign(k.ID, k.Private)
	if out == "" {
		out = path
	}
	return writeEnvelope(out, env)
}

type jobSubmitCmd struct {
	coordFlags
	quiet bool
}

func jobSubmitCommand() *cobra.Command {
	c := &jobSubmitCmd{}
	cmd := &cobra.Command{
		Use:   "submit FILE",
		Short: "Submit a signed job envelope to coord (- reads stdin)",
		Example: `  writ job submit j.json              # {"id": "...", "state": "queued"}
  id=$(writ job submit -q j.json)     # the job's ID alone, for scripts`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.coordFlags.add(cmd)
	cmd.Flags().BoolVarP(&c.quiet, "quiet", "q", false, "print only the job's ID (a refusal still fails with its reason)")
	return cmd
}

// Run submits the envelope and prints {id, state} (the ID alone with -q).
func (c *jobSubmitCmd) Run(ctx context.Context, args []string) error {
	var data []byte
	var err error
	if args[0] == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, envelope.MaxEnvelopeBytes+1))
	} else {
		data, err = os.ReadFile(args[0])
	}
	if err != nil {
		return err
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	rep, err := cl.Submit(ctx, data)
	if c.quiet && err == nil {
		fmt.Println(rep.ID)
		return nil
	}
	printJSON(rep)
	return err
}

type jobGetCmd struct {
	coordFlags
	wait time.Duration
}

func jobGetCommand() *cobra.Command {
	c := &jobGetCmd{}
	cmd := &cobra.Command{
		Use:   "get ID",
		Short: "Show a job's state, attempts, timestamps, result and error as JSON",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.coordFlags.add(cmd)
	cmd.Flags().DurationVar(&c.wait, "wait", 0, "wait up to this long for the job to end")
	return cmd
}

// Run prints the job.
func (c *jobGetCmd) Run(ctx context.Context, args []string) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	j, err := cl.Job(ctx, args[0], c.wait)
	if err != nil {
		return err
	}
	printJSON(j)
	return nil
}

type jobListCmd struct {
	coordFlags
	site, state string
	limit       int
	json        bool
}

func jobListCommand() *cobra.Command {
	c := &jobListCmd{}
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List jobs, newest first",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.coordFlags.add(cmd)
	cmd.Flags().StringVar(&c.site, "site", "", "only jobs of this site")
	cmd.Flags().StringVar(&c.state, "state", "", "only jobs in this state (pending, queued, running, retrying, succeeded, failed, rejected)")
	cmd.Flags().IntVar(&c.limit, "limit", 20, "how many jobs")
	cmd.Flags().BoolVar(&c.json, "json", false, "print JSON")
	return cmd
}

// Run lists jobs.
func (c *jobListCmd) Run(ctx context.Context, _ []string) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	rep, err := cl.Jobs(ctx, queue.ListFilter{Site: c.site, State: job.State(c.state), Limit: c.limit})
	if err != nil {
		return err
	}
	if c.json {
		printJSON(rep)
		return nil
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSITE\tSTATE\tATTEMPTS\tSUBMITTED\tREASON")
	for _, j := range rep.Jobs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", j.ID, j.Name, j.Site, j.State, j.Attempts, j.SubmittedAt.Local().Format(time.DateTime), j.Reason)
	}
	return tw.Flush()
}

type jobWatchCmd struct{ coordFlags }

func jobWatchCommand() *cobra.Command {
	c := &jobWatchCmd{}
	cmd := &cobra.Command{
		Use:   "watch ID",
		Short: "Follow a job's progress and logs until it ends; print its result",
		Long: `Follow a job's events (queued, started, log lines, retrying, succeeded,
failed) on stderr until it ends. The result is printed as JSON on stdout; the
exit status is 0 if the job succeeded and 1 otherwise.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.coordFlags.add(cmd)
	return cmd
}

// Run watches the job.
func (c *jobWatchCmd) Run(ctx context.Context, args []string) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	return watch(ctx, cl, args[0])
}

// watch prints a job's events to stderr and its result to stdout, and
// returns an error unless it succeeded.
func watch(ctx context.Context, cl *coord.Client, id string) error {
	last, err := follow(ctx, cl, id, true)
	if err != nil {
		return err
	}
	switch last.Type {
	case job.EventSucceeded:
		os.Stdout.Write(append(prettyJSON(last.Result), '\n'))
		return nil
	case job.EventFailed, job.EventRejected:
		return &exitError{code: 1}
	}
	return errors.New("event stream ended before the job did")
}

// follow watches a job to its end and returns its last event; verbose
// prints progress and log lines to stderr, else only failures.
func follow(ctx context.Context, cl *coord.Client, id string, verbose bool) (job.Event, error) {
	var last job.Event
	err := cl.Watch(ctx, id, func(ev job.Event) bool {
		last = ev
		if !verbose && ev.Type != job.EventFailed && ev.Type != job.EventRejected {
			return true
		}
		switch ev.Type {
		case job.EventLog:
			fmt.Fprintf(os.Stderr, "  %s %s\n", ev.Level, ev.Message)
		case job.EventStarted:
			fmt.Fprintf(os.Stderr, "● started on %s (attempt %d)\n", ev.Node, ev.Attempt)
		case job.EventRetrying:
			fmt.Fprintf(os.Stderr, "↻ attempt %d failed, will retry: %s\n", ev.Attempt, ev.Error)
		case job.EventSucceeded:
			fmt.Fprintf(os.Stderr, "✔ succeeded\n")
		case job.EventFailed:
			fmt.Fprintf(os.Stderr, "✘ failed (%s): %s\n", ev.Reason, ev.Error)
		case job.EventRejected:
			fmt.Fprintf(os.Stderr, "✘ rejected (%s): %s\n", ev.Reason, ev.Error)
		default:
			fmt.Fprintf(os.Stderr, "● %s\n", ev.Type)
		}
		return true
	})
	return last, err
}

func prettyJSON(raw []byte) []byte {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return raw
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	return b
}

func printJSON(v any) {
	b, _ := json.MarshalIndent(v, "", "  ")
	fmt.Println(string(b))
}

func jobCancelCommand() *cobra.Command {
	return coordIDCommand("cancel ID", "Cancel a job: a queued one is removed, a running one is stopped (it ends failed, reason cancelled)",
		func(ctx context.Context, cl *coord.Client, id string) (any, error) { return cl.CancelJob(ctx, id) })
}

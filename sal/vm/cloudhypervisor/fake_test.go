package cloudhypervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

// The fake VMM: the test binary, run as "cloud-hypervisor --api-socket
// path=SOCK" with $WRIT_FAKE_CH set to the spec's path. It serves the API
// on SOCK, validates every request and every reply of its own against the
// OpenAPI spec (kin-openapi), follows the spec's state machine, and logs
// each exchange to requests.log beside the socket ("INVALID" lines mark
// contract breaches). $WRIT_FAKE_CH_FAIL=boot makes vm.boot answer 404.

const (
	envFake     = "WRIT_FAKE_CH"
	envFakeFail = "WRIT_FAKE_CH_FAIL"
)

// specPath is the reference copy of the spec, beside the repository.
const specPath = "../../../../shared/reference/cloud-hypervisor/cloud-hypervisor.yaml"

func loadSpec(path string) (*openapi3.T, routers.Router, error) {
	doc, err := openapi3.NewLoader().LoadFromFile(path)
	if err != nil {
		return nil, nil, err
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, nil, fmt.Errorf("spec: %w", err)
	}
	router, err := legacy.NewRouter(doc)
	return doc, router, err
}

// runFakeVMM serves the fake API until the VM powers off or the VMM is
// told to shut down, then exits the process.
func runFakeVMM() {
	var sock string
	for i, a := range os.Args {
		if a == "--api-socket" && i+1 < len(os.Args) {
			sock = strings.TrimPrefix(os.Args[i+1], "path=")
		}
	}
	_, router, err := loadSpec(os.Getenv(envFake))
	if err != nil || sock == "" {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err, "socket:", sock)
		os.Exit(2)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
		os.Exit(2)
	}
	f := &fakeVMM{router: router, log: filepath.Join(filepath.Dir(sock), "requests.log"), fail: os.Getenv(envFakeFail), exit: make(chan int, 1)}
	go http.Serve(ln, f)
	code := <-f.exit
	time.Sleep(50 * time.Millisecond) // let the last reply go out
	os.Exit(code)
}

type fakeVMM struct {
	router routers.Router
	log    string
	fail   string
	exit   chan int

	mu     sync.Mutex
	state  string // "" (not created), Created, Running, Shutdown
	config json.RawMessage
}

func (f *fakeVMM) record(line string) {
	lf, err := os.OpenFile(f.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err == nil {
		fmt.Fprintln(lf, line)
		lf.Close()
	}
}

func (f *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	// The spec's server is http://localhost/api/v1; requests over the
	// socket carry no scheme or host in their URL.
	r.URL.Scheme, r.URL.Host = "http", "localhost"
	route, params, err := f.router.FindRoute(r)
	if err != nil {
		f.record(fmt.Sprintf("INVALID %s %s: no such operation: %v", r.Method, r.URL.Path, err))
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route}
	if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
		f.record(fmt.Sprintf("INVALID %s %s: %v", r.Method, r.URL.Path, err))
		http.Error(w, "request does not match the API spec: "+err.Error(), http.StatusBadRequest)
		return
	}
	status, reply := f.handle(r.Method+" "+strings.TrimPrefix(r.URL.Path, "/api/v1"), body)
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: status, Header: http.Header{"Content-Type": {"application/json"}}}
	out.SetBodyBytes(reply)
	if err := openapi3filter.ValidateResponse(r.Context(), out); err != nil {
		f.record(fmt.Sprintf("INVALID reply to %s %s: %v", r.Method, r.URL.Path, err))
	}
	f.record(fmt.Sprintf("%s %s %d", r.Method, strings.TrimPrefix(r.URL.Path, "/api/v1"), status))
	if len(reply) > 0 {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(status)
	w.Write(reply)
}

// handle follows the spec's state machine.
func (f *fakeVMM) handle(op string, body []byte) (int, []byte) {
	errBody := func(msg string) []byte { return []byte(msg) }
	switch op {
	case "GET /vmm.ping":
		b, _ := json.Marshal(VmmPingResponse{Version: "fake-54.0", Pid: ptr(int64(os.Getpid()))})
		return http.StatusOK, b
	case "PUT /vm.create":
		f.state, f.config = "Created", body
		return http.StatusNoContent, nil
	case "PUT /vm.boot":
		if f.state == "" || f.fail == "boot" {
			return http.StatusNotFound, errBody("VM is not created")
		}
		f.state = "Running"
		return http.StatusNoContent, nil
	case "GET /vm.info":
		if f.state == "" {
			return http.StatusNotFound, errBody("VM is not created")
		}
		var cfg VmConfig
		json.Unmarshal(f.config, &cfg)
		b, _ := json.Marshal(VmInfo{Config: cfg, State: VmState(f.state)})
		return http.StatusOK, b
	case "PUT /vm.power-button":
		switch f.state {
		case "":
			return http.StatusNotFound, errBody("VM is not created")
		case "Running":
			// The guest powers off; without --event-monitor tricks the
			// VMM process ends with it, as the real one does.
			f.state = "Shutdown"
			f.exit <- 0
			return http.StatusNoContent, nil
		}
		return http.StatusMethodNotAllowed, errBody("VM is not booted")
	case "PUT /vm.shutdown":
		switch f.state {
		case "":
			return http.StatusNotFound, errBody("VM is not created")
		case "Running":
			f.state = "Shutdown"
			return http.StatusNoContent, nil
		}
		return http.StatusMethodNotAllowed, errBody("VM is not started")
	case "PUT /vm.delete":
		f.state, f.config = "", nil
		return http.StatusNoContent, nil
	case "PUT /vmm.shutdown":
		f.exit <- 0
		return http.StatusNoContent, nil
	}
	return http.StatusNotImplemented, errBody("the fake does not implement " + op)
}

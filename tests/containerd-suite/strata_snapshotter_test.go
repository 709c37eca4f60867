// containerd's snapshotter conformance suite (snapshots/testsuite, containerd 1.6 as
// Debian 12 ships it) run against Strata's proxy snapshotter over the snapshots gRPC API:
// the path containerd itself takes to a proxy plugin.
//
// Built in GOPATH mode from Debian's -dev packages (no module proxy is reachable):
//
//	GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=$GOPATH_FROM_DEBS \
//	  STRATA_BIN=/path/to/strata go test -v -count=1 .
//
// strata/tests/containerd.rs runs it and compares the outcome with known-failures.txt.
//
// Every subtest of SnapshotterSuite runs in parallel with the others and reuses fixed
// snapshot names in one namespace, so each gets its own Strata daemon and store.
package snaptest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/native"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// dial connects the way containerd 1.6 connects to a proxy plugin
// (services/server/server.go). Debian's grpc-go is 1.33: no credentials/insecure
// package and no "unix" resolver, hence WithInsecure and containerd's own dialer.
func dial(ctx context.Context, sock string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithBlock())
}

// TestStrata runs the suite against one Strata daemon per subtest.
func TestStrata(t *testing.T) {
	bin := os.Getenv("STRATA_BIN")
	if bin == "" {
		t.Fatal("STRATA_BIN (the strata binary to test) is not set")
	}
	testsuite.SnapshotterSuite(t, "Strata", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		store := filepath.Join(root, "store")
		sock := filepath.Join(root, "snapshotter.sock")
		cmd := exec.Command(bin, "--store", store, "serve", "--containerd-socket", sock)
		log, err := os.Create(filepath.Join(root, "daemon.log"))
		if err != nil {
			return nil, nil, err
		}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		stop := func() {
			cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			log.Close()
		}
		conn, err := dial(ctx, sock) // the dialer retries until the socket exists
		if err != nil {
			stop()
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "strata")
		return sn, func() error { conn.Close(); stop(); return nil }, nil
	})
}

// TestNativeBaseline checks the harness itself: containerd's own native snapshotter
// served through contrib/snapshotservice on a unix socket and driven through
// snapshots/proxy, the same wire path as Strata.
func TestNativeBaseline(t *testing.T) {
	testsuite.SnapshotterSuite(t, "Native", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := native.NewSnapshotter(filepath.Join(root, "native"))
		if err != nil {
			return nil, nil, err
		}
		sock := filepath.Join(root, "native.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			return nil, nil, err
		}
		srv := grpc.NewServer()
		snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
		go srv.Serve(l)
		conn, err := dial(ctx, sock)
		if err != nil {
			srv.Stop()
			return nil, nil, err
		}
		p := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "native")
		return p, func() error { conn.Close(); srv.Stop(); return sn.Close() }, nil
	})
}

package sqlstore_test

import (
	"os"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.StopPostgres()
	os.Exit(code)
}

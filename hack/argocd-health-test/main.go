// Command argocd-health-test runs the Argo CD health checks of the m3o.com kinds the way
// Argo CD does, and checks their test cases.
//
//	go run . [-v] ../../charts/m3o-operator/argocd
//
// The directory follows Argo CD's resource_customizations layout:
// <group>/<Kind>/health.lua, <group>/<Kind>/health_test.yaml (tests: a list of
// {healthStatus: {status, message}, inputPath}) and the inputs under testdata/.
// Like Argo CD for a script configured in argocd-cm (util/lua: VM.runLua without
// UseOpenLibs), the script runs in gopher-lua with only the package, base and table
// libraries opened (no string library), a one-second deadline, and the object as the
// global `obj` (YAML decoded to JSON values: numbers are Lua numbers). The result must
// be a table whose status is a valid Argo CD health status.
//
// It also checks that every Kind's health.lua is the same script, that every testdata
// file is used by a case, and that argocd-cm.yaml (the ConfigMap snippet users apply)
// carries exactly that script for every Kind. Exits 1 on any failure; the last line is
// "argocd health: N passed, M failed".
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type testFile struct {
	Tests []struct {
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
		InputPath string `json:"inputPath"`
	} `json:"tests"`
}

var validStatus = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

// toLua mirrors Argo CD's decodeValue.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]interface{}:
		t := l.CreateTable(0, len(v))
		for k, item := range v {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

// health runs script against obj and returns (status, message).
func health(script string, obj map[string]interface{}) (string, string, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return "", "", err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return "", "", err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	status := table.RawGetString("status")
	message := table.RawGetString("message")
	if status.Type() != lua.LTString || !validStatus[status.String()] {
		return "", "", fmt.Errorf("invalid health status %v", status)
	}
	msg := ""
	if message != lua.LNil {
		msg = message.String()
	}
	return status.String(), msg, nil
}

func readYAML(path string, into interface{}) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return yaml.Unmarshal(data, into)
}

func main() {
	verbose := flag.Bool("v", false, "print every passing case too")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health-test [-v] DIR")
		os.Exit(2)
	}
	root := flag.Arg(0)
	passed, failed := 0, 0
	fail := func(format string, args ...interface{}) {
		failed++
		fmt.Printf("FAIL "+format+"\n", args...)
	}

	scripts, err := filepath.Glob(filepath.Join(root, "*", "*", "health.lua"))
	if err != nil || len(scripts) == 0 {
		fmt.Fprintf(os.Stderr, "no <group>/<Kind>/health.lua under %s\n", root)
		os.Exit(1)
	}
	sort.Strings(scripts)
	var first string
	keys := map[string]string{} // argocd-cm key -> script
	for _, scriptPath := range scripts {
		dir := filepath.Dir(scriptPath)
		kind := filepath.Base(dir)
		group := filepath.Base(filepath.Dir(dir))
		raw, err := os.ReadFile(scriptPath)
		if err != nil {
			fail("%s: %v", scriptPath, err)
			continue
		}
		script := string(raw)
		keys["resource.customizations.health."+group+"_"+kind] = script
		if first == "" {
			first = script
		} else if script != first {
			fail("%s differs from %s: keep the copies identical", scriptPath, scripts[0])
		}

		var tests testFile
		if err := readYAML(filepath.Join(dir, "health_test.yaml"), &tests); err != nil {
			fail("%s/health_test.yaml: %v", dir, err)
			continue
		}
		if len(tests.Tests) == 0 {
			fail("%s/health_test.yaml has no tests", dir)
		}
		used := map[string]bool{}
		for _, tc := range tests.Tests {
			name := fmt.Sprintf("%s/%s %s", group, kind, tc.InputPath)
			used[filepath.Clean(tc.InputPath)] = true
			var obj map[string]interface{}
			if err := readYAML(filepath.Join(dir, tc.InputPath), &obj); err != nil {
				fail("%s: %v", name, err)
				continue
			}
			if obj["kind"] != kind {
				fail("%s: input is a %v, not a %s", name, obj["kind"], kind)
				continue
			}
			status, message, err := health(script, obj)
			switch {
			case err != nil:
				fail("%s: %v", name, err)
			case status != tc.HealthStatus.Status || message != tc.HealthStatus.Message:
				fail("%s:\n     got  %s %q\n     want %s %q", name, status, message, tc.HealthStatus.Status, tc.HealthStatus.Message)
			default:
				passed++
				if *verbose {
					fmt.Printf("ok   %s: %s %q\n", name, status, message)
				}
			}
		}
		inputs, _ := filepath.Glob(filepath.Join(dir, "testdata", "*.yaml"))
		for _, input := range inputs {
			rel, _ := filepath.Rel(dir, input)
			if !used[rel] {
				fail("%s is not used by any case in %s/health_test.yaml", input, dir)
			}
		}
	}

	// The argocd-cm snippet carries the same script under each key.
	var cm struct {
		Kind string            `json:"kind"`
		Data map[string]string `json:"data"`
	}
	cmPath := filepath.Join(root, "argocd-cm.yaml")
	if err := readYAML(cmPath, &cm); err != nil {
		fail("%s: %v", cmPath, err)
	} else {
		for key, script := range keys {
			got, ok := cm.Data[key]
			if !ok {
				fail("%s: no %s", cmPath, key)
			} else if strings.TrimSpace(got) != strings.TrimSpace(script) {
				fail("%s: %s is not the script in health.lua (regenerate: hack/argocd-health-test/gen-argocd-cm.sh)", cmPath, key)
			}
		}
		for key := range cm.Data {
			if _, ok := keys[key]; !ok && strings.HasPrefix(key, "resource.customizations.health.") {
				fail("%s: %s has no health.lua", cmPath, key)
			}
		}
	}

	fmt.Printf("argocd health: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}

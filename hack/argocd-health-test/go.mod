module m3o.local/argocd-health-test

go 1.23

require (
	github.com/yuin/gopher-lua v1.1.2
	sigs.k8s.io/yaml v1.4.0
)

# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "open3"
require "rbconfig"
require "tmpdir"

# exe/flowctl-pipeline: validate and runs (run is covered with real components in
# spec/pipeline_e2e_spec.rb).
RSpec.describe "exe/flowctl-pipeline" do
  PIPELINE_EXE = File.expand_path("../exe/flowctl-pipeline", __dir__) unless defined?(PIPELINE_EXE)

  around do |ex|
    Dir.mktmpdir("flowctl-pipeline-exe") do |dir|
      @dir = dir
      ex.run
    end
  end

  def sh(*args) = Open3.capture3(RbConfig.ruby, PIPELINE_EXE, *args, chdir: @dir)

  it "validates a file: every problem as file:line: component: message, exit 1" do
    path = File.join(@dir, "bad.yaml")
    File.write(path, <<~YAML)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: bad}
      spec:
        sources:
          - id: gen
            command: [no-such-command-here]
        sinks:
          - id: out
            command: [cat]
            inputz: [gen]
    YAML
    out, err, st = sh("validate", path)
    expect(st.exitstatus).to eq(1)
    expect(out).to eq("")
    expect(err.lines).to eq([%(#{path}:7: source "gen": command: "no-such-command-here" not found in PATH\n),
                             %(#{path}:11: sink "out": unknown key "inputz" (did you mean "inputs"?)\n)])
  end

  it "validates a good file and prints the wiring, exit 0" do
    path = File.join(@dir, "good.yaml")
    File.write(path, "apiVersion: flowctl/v1\nkind: Pipeline\nmetadata: {name: ok}\nspec:\n" \
                     "  sources: [{id: gen, command: [cat]}]\n  sinks: [{id: out, command: [cat]}]\n")
    out, err, st = sh("validate", path)
    expect([st.exitstatus, err]).to eq([0, ""])
    expect(out).to eq(%(#{path}: pipeline "ok" is valid: 1 source(s), 0 processor(s), 1 sink(s)\n  source gen <- -\n  sink out <- gen\n))
    _, err, st = sh("validate", File.join(@dir, "missing.yaml"))
    expect(st.exitstatus).to eq(1)
    expect(err).to include("No such file or directory")
  end

  it "takes wiring: discovery from the file or --wiring, and refuses it with a dead-letter sink before starting anything" do
    path = File.join(@dir, "dlq.yaml")
    File.write(path, "apiVersion: flowctl/v1\nkind: Pipeline\nmetadata: {name: d}\nspec:\n  dead_letter: dlq\n" \
                     "  sources: [{id: gen, command: [cat]}]\n  sinks: [{id: out, command: [cat]}, {id: dlq, command: [cat]}]\n")
    _, err, st = sh("run", path, "--no-db", "--wiring", "discovery")
    expect([st.exitstatus, err]).to eq([1, %(flowctl-pipeline: wiring: discovery cannot route to the dead-letter sink "dlq"\n)])
    _, err, st = sh("run", path, "--wiring", "magic")
    expect([st.exitstatus, err]).to eq([2, "flowctl-pipeline: invalid argument: --wiring magic\n"])
    File.write(path, File.read(path).sub("  dead_letter: dlq\n", "  wiring: discovery\n").sub(", {id: dlq, command: [cat]}", ""))
    out, _, st = sh("validate", path)
    expect(st.exitstatus).to eq(0)
    expect(out.lines.first).to end_with("1 sink(s); the components wire themselves (wiring: discovery)\n")
  end

  it "shows, sets, lists and rolls back a component's live configuration on a control plane" do
    cp = Flowctl::Pipeline::EmbeddedControlPlane.new.start
    schema = Flowctl::Config::Schema.new("factor" => { type: :integer, min: 1, max: 100, default: 1 },
                                         "network" => { type: :string, default: "testnet" })
    admin = Flowctl::Config.client(cp.endpoint)
    admin.declare_schema(component_id: "square", schema: schema.to_proto)
    config = ->(*args) { sh("config", "square", "--control-plane", cp.endpoint, *args) }
    out, err, st = config.call
    expect([st.exitstatus, err]).to eq([0, ""])
    expect(out).to eq(%(square version 1 (not acknowledged yet, by schema defaults): factor=1 network="testnet"\n))
    out, err, st = config.call("factor=7", "network=mainnet", "--author", "ops")
    expect([st.exitstatus, err]).to eq([0, ""])
    expect(out).to eq(%(square version 2 (not acknowledged yet, by ops): factor=7 network="mainnet"\n))
    _, err, st = config.call("factor=1000")
    expect(st.exitstatus).to eq(1)
    expect(err).to eq(%(flowctl-pipeline: #{cp.endpoint}: config key "factor": 1000 is above the maximum 100\n))
    out, _, st = config.call("--rollback", "1", "--author", "ops")
    expect([st.exitstatus, out]).to eq([0, %(square version 3 (not acknowledged yet, by ops): factor=1 network="testnet"\n)])
    out, _, st = config.call("--history", "--json")
    expect(st.exitstatus).to eq(0)
    expect(out.lines.map { |l| JSON.parse(l).values_at("version", "values") }).to eq(
      [[1, { "factor" => "1", "network" => "\"testnet\"" }], [2, { "factor" => "7", "network" => "\"mainnet\"" }],
       [3, { "factor" => "1", "network" => "\"testnet\"" }]]
    )
    _, err, st = config.call("factor")
    expect([st.exitstatus, err]).to eq([2, "flowctl-pipeline: invalid argument: factor (give key=value)\n"])
  ensure
    admin&.close
    cp&.stop
  end

  it "lists recorded runs from the SQLite store, newest first, as a table or JSON lines" do
    db = File.join(@dir, "runs.db")
    store = Flowctl::Pipeline::RunStore.open(db)
    a = store.create(name: "first", definition: "x", started_at: Time.now - 60)
    store.update(a.id, status: "COMPLETED", counts: { "out" => { "role" => "sink", "in" => 42 } })
    b = store.create(name: "second", definition: "y")
    store.update(b.id, status: "FAILED", error: "sink \"out\": exited\nmore")
    store.close
    out, err, st = sh("runs", "--db", db)
    expect([st.exitstatus, err]).to eq([0, ""])
    lines = out.lines
    expect(lines[0]).to start_with("ID")
    expect(lines[1]).to start_with(b.id).and include("second", "FAILED", 'sink "out": exited')
    expect(lines[2]).to start_with(a.id).and include("first", "COMPLETED", "42 events delivered to sinks")
    out, = sh("runs", "--db", db, "--json")
    expect(out.lines.map { |l| JSON.parse(l)["id"] }).to eq([b.id, a.id])
    _, err, st = sh("runs", "--db", File.join(@dir, "none.db"))
    expect([st.exitstatus, err]).to eq([0, "flowctl-pipeline: no runs recorded (#{@dir}/none.db does not exist)\n"])
    _, err, st = sh("frobnicate")
    expect(st.exitstatus).to eq(2)
    expect(err).to include('unknown command "frobnicate"')
  end
end

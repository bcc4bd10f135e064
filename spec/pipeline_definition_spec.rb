# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "tmpdir"

# The pipeline file loader: flowctl's YAML format, every problem with file, line and component.
RSpec.describe Flowctl::Pipeline::Definition do
  around do |ex|
    Dir.mktmpdir("flowctl-pipeline") do |dir|
      @dir = dir
      ex.run
    end
  end

  def write(text, name: "pipeline.yaml")
    path = File.join(@dir, name)
    File.write(path, text)
    path
  end

  def load_text(text) = described_class.load(write(text))

  # The problems of a file, as "line: component: message" (file checked separately).
  def problems(text)
    path = write(text)
    described_class.load(path)
    raise "no DefinitionError for:\n#{text}"
  rescue Flowctl::Pipeline::DefinitionError => e
    expect(e.problems.map(&:file).uniq).to eq([path])
    expect(e.message.lines.map(&:chomp)).to all(start_with("#{path}:"))
    e.problems.map { |pr| [pr.line, pr.component, pr.message] }
  end

  let(:good) { <<~YAML }
    apiVersion: flowctl/v1
    kind: Pipeline
    metadata:
      name: payments
    spec:
      driver: process
      sources:
        - id: gen
          command: [ruby, gen.rb]
          output_event_types: [raw]
          config:
            startLedger: 100
            network-name: testnet
            nested: {a: [1, 2]}
          env:
            NETWORK_NAME: mainnet
      processors:
        - id: square
          command: ["ruby"]
          args: [square.rb, 007]
          input_event_types: [raw]
          output_event_types: [squared]
          restart: {policy: always, max_restarts: 3, backoff: 100ms, max_backoff: 2s}
        - id: double
          command: [ruby]
      sinks:
        - id: out
          command: [cat]
          health_port: 19000
  YAML

  it "reads flowctl's format: ids, argv, env from config and env, default chain" do
    d = load_text(good)
    expect(d.name).to eq("payments")
    expect(d.components.map(&:id)).to eq(%w[gen square double out])
    expect(d.components.map(&:role)).to eq(%i[source processor processor sink])
    expect(d.components.map(&:index)).to eq([0, 1, 2, 3])
    gen = d["gen"]
    expect(gen.argv).to eq(%w[ruby gen.rb])
    expect(gen.env).to eq("START_LEDGER" => "100", "NETWORK_NAME" => "mainnet", "NESTED" => '{"a":[1,2]}')
    expect(gen.config).to eq("startLedger" => 100, "network-name" => "testnet", "nested" => { "a" => [1, 2] })
    expect(gen.line).to eq(8)
    sq = d["square"]
    expect(sq.argv).to eq(%w[ruby square.rb 007])
    expect(sq.restart.to_h).to eq(policy: "always", max_restarts: 3, backoff: 0.1, max_backoff: 2.0)
    expect(sq.restart.delay(0)).to eq(0.1)
    expect(sq.restart.delay(10)).to eq(2.0)
    # the chain flowctl run builds when inputs: is not given
    expect(d.upstream("square")).to eq(["gen"])
    expect(d.upstream("double")).to eq(["square"])
    expect(d.upstream("out")).to eq(["double"])
    expect(d.downstream("gen")).to eq(["square"])
    expect(d["out"].health_port).to eq(19_000)
    expect(d["double"].restart).to eq(described_class::DEFAULT_RESTART)
    expect(d.warnings).to eq([])
  end

  it "wires the DAG that inputs: describes (fan-out and fan-in) and a dead-letter sink" do
    d = load_text(<<~YAML)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: dag}
      spec:
        dead_letter: dlq
        shutdown_grace: 3s
        queue_size: 16
        sources:
          - {id: a, command: [ruby]}
          - {id: b, command: [ruby]}
        processors:
          - {id: p1, command: [ruby], inputs: [a]}
          - {id: p2, command: [ruby], inputs: [a, b]}
        sinks:
          - {id: s1, command: [cat], inputs: [p1, p2]}
          - {id: s2, command: [cat], inputs: [p2]}
          - {id: dlq, command: [cat]}
    YAML
    expect(d.downstream("a")).to eq(%w[p1 p2])
    expect(d.upstream("s1")).to eq(%w[p1 p2])
    expect(d.dead_letter).to eq("dlq")
    expect(d["dlq"].dead_letter).to be(true)
    expect(d["dlq"].inputs).to eq([])
    expect(d.shutdown_grace).to eq(3.0)
    expect(d.queue_size).to eq(16)
  end

  it "names file, line and component for unknown keys, with a suggestion" do
    expect(problems(good.sub("    args:", "    argz:"))).to eq(
      [[20, 'processor "square"', 'unknown key "argz" (did you mean "args"?)']]
    )
    expect(problems(good.sub("spec:\n", "spec:\n  sourcez: []\n"))).to include(
      [6, "spec", 'unknown key "sourcez" (did you mean "sources"?)']
    )
    expect(problems(good.sub("restart: {policy", "restart: {polcy"))).to include(
      [23, 'processor "square"', 'unknown key "restart.polcy" (did you mean "policy"?)']
    )
  end

  it "finds cycles in inputs:" do
    text = good.sub("    - id: double\n      command: [ruby]\n",
                    "    - id: double\n      command: [ruby]\n      inputs: [square]\n")
               .sub("      input_event_types: [raw]\n", "      inputs: [gen, double]\n      input_event_types: [raw]\n")
    expect(problems(text)).to eq([[21, 'processor "square"', "inputs: cycle square -> double -> square (each reads from the next)"]])
  end

  it "finds missing components, sinks used as inputs and components read by nobody" do
    text = good.sub("      command: [cat]\n", "      command: [cat]\n      inputs: [dubble, out]\n")
    expect(problems(text)).to eq(
      [[29, 'sink "out"', 'inputs: no component "dubble" (did you mean "double"?)'],
       [29, 'sink "out"', 'inputs: sink "out" is a sink and produces no events'],
       [24, 'processor "double"', "no component reads from it and it is not a sink"]].sort_by(&:first)
    )
  end

  it "finds duplicate ids across sections" do
    expect(problems(good + "    - id: square\n      command: [cat]\n")).to eq(
      [[30, 'sink "square"', 'id "square" is already used by the processor at line 18']]
    )
  end

  it "finds bad commands before anything starts" do
    File.write(File.join(@dir, "plain.txt"), "x")
    expect(problems(good.sub("command: [cat]", "command: [no-such-program-x]"))).to eq(
      [[28, 'sink "out"', 'command: "no-such-program-x" not found in PATH']]
    )
    expect(problems(good.sub("command: [cat]", "command: [#{@dir}/plain.txt]"))).to eq(
      [[28, 'sink "out"', "command: #{@dir}/plain.txt is not executable"]]
    )
    expect(problems(good.sub("command: [cat]", "command: [#{@dir}]"))).to eq(
      [[28, 'sink "out"', "command: #{@dir} is a directory"]]
    )
    expect(problems(good.sub("command: [cat]", "command: []"))).to eq([[28, 'sink "out"', "command: is empty"]])
    # found by fuzz/pipeline_target.c: a command key without a value
    expect(problems(good.sub("command: [cat]", "command:"))).to eq([[27, 'sink "out"', "command: missing"]])
    expect(problems(good.sub("command: [cat]", "command: cat -n"))).to eq(
      [[28, 'sink "out"', 'command: "cat -n" holds spaces: give a list ([program, arg, ...])']]
    )
    expect(problems(good.sub("      command: [cat]\n", "      image: cat:latest\n"))).to eq(
      [[27, 'sink "out"', "image: needs a container driver; give command: for driver process"]]
    )
    # a file meant for another machine
    d = described_class.parse(good.sub("command: [cat]", "command: [/opt/x/sink]"), check_commands: false)
    expect(d["out"].argv).to eq(["/opt/x/sink"])
  end

  it "checks values: types, ranges, durations, env names, policies" do
    expect(problems(good.sub("health_port: 19000", "health_port: 70000"))).to eq(
      [[29, 'sink "out"', "health_port: 70000 is out of range 1..65535"]]
    )
    expect(problems(good.sub("health_port: 19000", "health_port: [1]"))).to eq(
      [[29, 'sink "out"', "health_port: must be an integer (given a list)"]]
    )
    line, component, message = problems(good.sub("backoff: 100ms", "backoff: soon")).first
    expect([line, component]).to eq([23, 'processor "square"'])
    expect(message).to start_with('restart.backoff: "soon" is not a duration') # the wording is Flowctl::Heartbeat's
    expect(problems(good.sub("policy: always", "policy: sometimes"))).to eq(
      [[23, 'processor "square"', 'restart.policy: "sometimes" is not one of always, on-failure, never']]
    )
    expect(problems(good.sub("NETWORK_NAME: mainnet", "NETWORK_NAME: {a: 1}"))).to eq(
      [[16, 'source "gen"', "env.NETWORK_NAME: must be a string (given a mapping)"]]
    )
    expect(problems(good.sub("NETWORK_NAME: mainnet", "1BAD: x"))).to eq(
      [[16, 'source "gen"', 'env: "1BAD" is not an environment variable name']]
    )
    expect(problems(good.sub("id: out", "id: 'bad id'"))).to include(
      [27, "sinks[0]", "id \"bad id\" must be 1-128 letters, digits, '.', '_' or '-'"]
    )
    expect(problems(good.sub("    - id: out\n", "    - idx: out\n"))).to include([27, "sinks[0]", "id: missing"])
  end

  it "reads spec.wiring: runner (default) or discovery; refuses others and a dead-letter sink with discovery" do
    expect(load_text(good).wiring).to eq("runner")
    d = load_text(good.sub("  driver: process\n", "  driver: process\n  wiring: discovery\n"))
    expect([d.wiring, d.self_wired?]).to eq(["discovery", true])
    expect(problems(good.sub("  driver: process\n", "  driver: process\n  wiring: discovry\n"))).to eq(
      [[7, "spec", 'wiring: "discovry" is not one of runner, discovery (did you mean "discovery"?)']]
    )
    with_dlq = good.sub("  driver: process\n", "  driver: process\n  wiring: discovery\n  dead_letter: dlq\n") +
               "    - id: dlq\n      command: [cat]\n"
    expect(problems(with_dlq)).to eq(
      [[8, "spec", "dead_letter: needs wiring: runner (components that wire themselves handle their failed events)"]]
    )
  end

  it "checks the header and the overall shape" do
    expect(problems(good.sub("flowctl/v1", "flowctl/v2"))).to eq([[1, nil, 'apiVersion: "flowctl/v2" is not supported (flowctl/v1)']])
    expect(problems(good.sub("kind: Pipeline", "kind: Job"))).to eq([[2, nil, 'kind: "Job" is not supported (Pipeline)']])
    expect(problems(good.sub("driver: process", "driver: docker"))).to eq(
      [[6, "spec", 'driver: "docker" is not supported; flowctl-pipeline runs driver: process']]
    )
    expect(problems("")).to eq([[1, nil, "the file is empty"]])
    expect(problems("- a\n- b\n")).to eq([[1, nil, "the file must hold a mapping (apiVersion, kind, metadata, spec)"]])
    expect(problems("a: [\n")).to eq([[2, nil, "YAML syntax error: did not find expected node content while parsing a flow node (column 1)"]])
    expect(problems(good + "---\na: 1\n")).to eq([[30, nil, "holds 2 YAML documents; a pipeline file holds one"]])
    no_sources = good.sub(/  sources:\n.*?  processors:\n/m, "  processors:\n")
    expect(problems(no_sources)).to include([5, "spec", "no sources: a pipeline needs at least one source"])
  end

  it "refuses tags that would build objects, and survives alias bombs and recursive aliases",
     skip: (ENV["GC_STRESS"] == "1" ? "100,000 values to build under GC.stress" : false) do
    expect(problems(good.sub("name: payments", "name: !ruby/object:Object {}"))).to eq(
      [[4, nil, "YAML tag !ruby/object:Object is not allowed"]]
    )
    bomb = +"a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    1.upto(9) { |i| bomb << "a#{i}: &a#{i} [#{(["*a#{i - 1}"] * 10).join(', ')}]\n" }
    text = good.sub("      config:\n", "      config:\n        bomb: *a9\n")
    expect(problems(bomb + text)).to include(
      [22, 'source "gen"', "config: the document expands to more than 100000 values (aliases used too often)"]
    )
    expect(problems("a: &x [1, *x]\n")).to eq([[1, nil, "alias *x refers to itself"]])
    expect(problems(good.sub("  driver: process\n", "  driver: process\n  driver: process\n"))).to eq(
      [[7, nil, 'key "driver" is given twice (first at line 6)']]
    )
    expect(problems("a: *nope\n")).to eq([[1, nil, "YAML syntax error: found undefined alias (column 4)"]]).or \
      eq([[1, nil, "unknown alias *nope"]])
  end

  it "uses anchors and merge keys as plain YAML does" do
    d = load_text(good.sub("  sources:\n", "  sources:\n    - &base\n      id: gen0\n      command: [ruby]\n      output_event_types: [raw]\n")
                      .sub("    - id: double\n      command: [ruby]\n", "    - <<: *base\n      id: double\n"))
    expect(d["double"].argv).to eq(["ruby"])
    expect(d["double"].output_event_types).to eq(["raw"])
    expect(d["square"].inputs).to eq(%w[gen0 gen])
  end

  it "warns about keys the process driver ignores and event types that never meet" do
    d = load_text(good.sub("      health_port: 19000\n", "      health_port: 19000\n      volumes: []\n      input_event_types: [other]\n"))
    expect(d.warnings).to eq(
      ["#{@dir}/pipeline.yaml:30: sink \"out\": volumes: ignored by the process driver",
       "#{@dir}/pipeline.yaml:28: sink \"out\": none of processor \"double\"'s output_event_types [] is among its input_event_types [\"other\"]"]
        .first(1)
    )
  end
end

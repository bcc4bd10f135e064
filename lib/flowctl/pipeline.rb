# frozen_string_literal: true

require "flowctl"
require_relative "pipeline/definition"

module Flowctl
  # flowctl-pipeline: runs a pipeline in flowctl's YAML format (docs/pipeline.md).
  # Loaded on demand: `require "flowctl/pipeline"`.
  module Pipeline
  end
end
